"""Peak resident memory and wall time of ``serq-onnx convert`` on one model, with a memory cap.

    .venv/bin/python benchmarks/convert_memory.py MODEL.onnx OUT_DIR --calib emma.txt \
        [--samples 4 --seqlen 256] [--cap-gib 20] [--json result.json] [--extra="--weight-quant rtn"]

Runs the conversion as a child process, samples the resident memory of it and its children
every 0.2 s (psutil) and kills it when their anonymous memory passes ``--cap-gib`` (so a model
too big for the machine fails alone instead of pushing the machine into the OOM killer). Prints
one JSON line: model bytes on disk, peak RSS and peak anonymous RSS (RSS less the file-backed
pages, which the kernel can drop and read again: what memory pressure cannot reclaim; they
differ where sessions map the weights, ``--low-memory``), wall seconds, the conversion's own
per-stage timings and peak RSS (``serq_config.json``), and whether it was killed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """RSS and anonymous RSS (RSS less the file-backed and shared pages) of ``proc`` and its
    children."""
    total = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        total += info.rss
        anon += info.rss - info.shared
    return total, anon


def model_bytes(model: Path) -> int:
    """The model file and its external data files beside it."""
    folder = model.parent
    files = [model, *folder.glob(model.name + "_data"), *folder.glob(model.name + ".data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def measure(cmd: list[str], cap: int, interval: float = 0.2) -> dict:
    t = time.perf_counter()
    # Run from a neutral folder: `python -m` puts the working directory first on sys.path, and
    # from the repository root that is the source tree, without the passes an install maps in.
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=tempfile.gettempdir())
    proc, peak, peak_anon, killed = psutil.Process(child.pid), 0, 0, False
    while child.poll() is None:
        rss, anon = _tree_rss(proc)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        if anon > cap:
            child.kill()
            killed = True
            break
        time.sleep(interval)
    out = child.communicate()[0]
    return {"rc": child.returncode, "killed_at_cap": killed, "peak_rss_mib": round(peak / 2**20),
            "peak_anon_mib": round(peak_anon / 2**20),
            "wall_s": round(time.perf_counter() - t, 1), "tail": out[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--samples", type=int, default=4, help="calibration sequences (default 4)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--cap-gib", type=float, default=20.0,
                   help="kill the conversion above this anonymous resident memory (default 20)")
    p.add_argument("--json", type=Path, default=None, help="also append the result here")
    p.add_argument("--extra", default="",
                   help="further convert flags, one quoted string given as --extra=\"...\" (a lone "
                   "flag after a space would be read as this script's own; default none)")
    args = p.parse_args(argv)
    args.model, args.out, args.calib = (a.resolve() for a in (args.model, args.out, args.calib))
    cmd = [sys.executable, "-m", "serq_onnx.cli", "convert", str(args.model), "-o",
           str(args.out), "--calib", str(args.calib), "--calib-samples", str(args.samples),
           "--calib-seqlen", str(args.seqlen), "--overwrite", "-q", *shlex.split(args.extra)]
    result = {"model": str(args.model), "model_mib": round(model_bytes(args.model) / 2**20),
              "samples": args.samples, "seqlen": args.seqlen, "extra": args.extra,
              **measure(cmd, int(args.cap_gib * 2**30))}
    cfg = args.out / "serq_config.json"
    if result["rc"] == 0 and cfg.is_file():
        report = json.loads(cfg.read_text())
        result["timings"] = {k: round(v, 1) for k, v in report["timings"].items()}
        result["stage_peak_rss_mib"] = report.get("peak_rss_mib", {})
    print(json.dumps(result))
    if args.json:
        rows = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.write_text(json.dumps([*rows, result], indent=1) + "\n")
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
