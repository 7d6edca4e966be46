"""Perplexity against calibration size (sequences x tokens per sequence) for SmolLM2-135M.

    .venv/bin/python benchmarks/calib_curve.py --cache .cache [--points w4a8:8x512,w4a8:32x512]
        [--out /tmp/calib-curve] [--json curve.json]

For each point runs ``serq-onnx convert ... --calib emma.txt --calib-samples S --calib-seqlen L``
and ``serq-onnx eval ... --ctx 1024 --max-tokens 8192`` (the evaluation of
models/smollm2-135m/RESULTS.md: first 8192 tokens of Pride and Prejudice, 1024-token windows),
records the conversion's wall time, its calibration time and the perplexity, and prints a
markdown table. Each finished point is appended to ``--json`` at once, so an interrupted run
keeps what it measured; points already there are not rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_POINTS = ("w4a8:8x512,w4a8:16x512,w4a8:32x512,w4a8:64x512,w4a8:32x1024,w4a8:32x2048,"
                  "w4a8:128x2048,w4a4:8x512,w4a4:32x512,w4a4:64x512")
EVAL_ARGS = ["--ctx", "1024", "--max-tokens", "8192", "--last-word", "0", "-q"]


def parse_points(text: str) -> list[tuple[str, int, int]]:
    """``"w4a8:32x512,w4a4:8x512"`` -> ``[("w4a8", 32, 512), ("w4a4", 8, 512)]``."""
    points = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        scheme, size = item.split(":")
        samples, seqlen = size.lower().split("x")
        points.append((scheme, int(samples), int(seqlen)))
    return points


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "serq_onnx.cli", *args]


def run_point(cache: Path, out_root: Path, scheme: str, samples: int, seqlen: int) -> dict:
    """Convert at one calibration size and evaluate; the measured figures."""
    model = cache / "smollm2-135m" / "onnx-fp32" / "model.onnx"
    out = out_root / f"{scheme}-{samples}x{seqlen}"
    t = time.perf_counter()
    conv = subprocess.run(_cli("convert", str(model), "-o", str(out), "--scheme", scheme,
                               "--calib", str(cache / "austen" / "emma.txt"),
                               "--calib-samples", str(samples), "--calib-seqlen", str(seqlen),
                               "--overwrite", "-q", "--json"),
                          check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    report = json.loads(conv.stdout[conv.stdout.index("{"):])
    ev = subprocess.run(_cli("eval", str(out), "--text",
                             str(cache / "austen" / "prideprejudice.txt"), *EVAL_ARGS, "--json"),
                        check=True, capture_output=True, text=True)
    result = json.loads(ev.stdout[ev.stdout.index("{"):])
    return {"scheme": scheme, "samples": samples, "seqlen": seqlen,
            "tokens": report["calib_tokens"], "convert_s": round(seconds, 1),
            "timings": {k: round(v, 1) for k, v in report["timings"].items()},
            "ppl": round(result["perplexity"]["ppl"], 3)}


def table(rows: list[dict]) -> str:
    lines = ["| scheme | samples x seqlen | tokens | perplexity | convert (s) | calibration (s) "
             "| GPTQ (s) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["scheme"], r["tokens"], r["seqlen"])):
        t = r["timings"]
        lines.append(f"| {r['scheme']} | {r['samples']} x {r['seqlen']} | {r['tokens']} | "
                     f"{r['ppl']:.3f} | {r['convert_s']:.0f} | {t.get('calibration', 0):.0f} | "
                     f"{t.get('gptq', 0):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".cache"),
                   help="folder with smollm2-135m/onnx-fp32 and austen/ (default .cache)")
    p.add_argument("--points", default=DEFAULT_POINTS,
                   help=f"scheme:SAMPLESxSEQLEN, comma-separated (default {DEFAULT_POINTS})")
    p.add_argument("--out", type=Path, default=Path("/tmp/calib-curve"),
                   help="folder for the converted models (default /tmp/calib-curve)")
    p.add_argument("--json", type=Path, default=Path("calib_curve.json"),
                   help="results, appended point by point (default calib_curve.json)")
    args = p.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json.is_file() else []
    done = {(r["scheme"], r["samples"], r["seqlen"]) for r in rows}
    args.out.mkdir(parents=True, exist_ok=True)
    for point in parse_points(args.points):
        if point in done:
            continue
        row = run_point(args.cache, args.out, *point)
        print(json.dumps(row), flush=True)
        rows.append(row)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
