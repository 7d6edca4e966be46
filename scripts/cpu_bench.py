"""``make bench-cpu``: every CPU figure of models/RESULTS-cpu.md, from a fresh clone.

1. SmolLM2-135M and Jane Austen's novels (fetched and cached as ``make demo`` does), the float32
   Optimum export, and the model converted at both schemes with the default settings
   (calibration: ``serq_onnx.calibration``'s default sequences of *Emma*), reused when their
   ``serq_config.json`` says they were converted with the current defaults;
2. ``serq-onnx bench --suite all``: per layer, SmolLM2 and Llama-3-8B shapes;
3. ``benchmarks/cpu_model_bench.py``: the whole model against float32, MatMulNBits, dynamic
   int8 and llama.cpp, and its ``--profile`` of a decode step;
4. the perplexity of every ONNX variant on *Pride and Prejudice* (8192 tokens, 1024-token
   windows).

Everything lands in ``--out`` (default ``models/cpu-bench``): JSON, the plot, markdown tables,
and ``commands.txt`` with what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from serq_onnx import calibration  # noqa: E402  (the installed package, as below)

CALIB = dict(calib_samples=calibration.DEFAULT_SAMPLES, calib_seqlen=calibration.DEFAULT_SEQLEN)


def _run(cmd: list[str], log: Path, out: Path | None = None) -> None:
    """Run ``cmd``, echoing it to ``commands.txt`` and its output to the terminal (and ``out``)."""
    shown = " ".join(str(c) for c in cmd)
    with log.open("a") as f:
        f.write(shown + "\n")
    print(f"== {shown}", flush=True)
    t = time.perf_counter()
    # Outside the source tree, so that `python -m serq_onnx.cli` is the installed package.
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, cwd=log.parent)
    sys.stdout.write(proc.stdout)
    if out is not None:
        out.write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"cpu_bench: {shown} failed with exit code {proc.returncode}")
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)


def _current(folder: Path, scheme: str) -> bool:
    """Whether ``folder`` holds a conversion with the current defaults at ``scheme``."""
    from serq_onnx.plan import ConvertConfig

    try:
        report = json.loads((folder / "serq_config.json").read_text())
    except (OSError, ValueError):
        return False
    want = ConvertConfig(scheme=scheme)
    got = report.get("config", {})
    same = all(got.get(k) == v for k, v in vars(want).items() if k != "lm_head")
    return (same and got.get("lm_head") in ("int8", "float")
            and str(report.get("attention", "")).startswith("GroupQueryAttention")
            and report.get("calib_tokens") == CALIB["calib_samples"] * CALIB["calib_seqlen"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO / ".cache")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "cpu-bench")
    ap.add_argument("--suite", default="all", help="per-layer shapes (default: all)")
    ap.add_argument("--seconds", default="0.3", help="per-layer timing per case (default 0.3)")
    ap.add_argument("--reps", default="5", help="whole-model repetitions (default 5)")
    ap.add_argument("--keep-layers", action="store_true",
                    help="reuse --out's layers.json instead of timing the layers again (default: "
                    "time them)")
    args = ap.parse_args(argv)
    from serq_onnx import data  # the installed package: it carries the op library
    from serq_onnx.converter import convert
    from serq_onnx.export import export_causal_lm

    cache = args.cache.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.txt"
    if not (args.keep_layers and (out / "layers.json").is_file()):
        log.write_text("")
    os.environ["SERQ_CACHE"] = str(cache)

    hf_dir = data.smollm2_hf_dir(cache)
    texts = data.austen_texts(cache)
    float_model = export_causal_lm(hf_dir, cache / "smollm2-135m" / "onnx-fp32")
    models = {}
    for scheme in ("w4a8", "w4a4"):
        folder = cache / "smollm2-135m" / f"bench-serq-{scheme}"
        if not _current(folder, scheme):
            with log.open("a") as f:
                f.write(f"serq-onnx convert {float_model} -o {folder} --scheme {scheme} --calib "
                        f"{texts['emma']} --overwrite\n")
            report = convert(float_model, folder, scheme=scheme, calib=texts["emma"],
                             overwrite=True, **CALIB)
            print(report.summary(), flush=True)
        models[scheme] = folder

    py = sys.executable
    cli = [py, "-m", "serq_onnx.cli"]
    if args.keep_layers and (out / "layers.json").is_file():
        print(f"== per-layer figures kept from {out / 'layers.json'}", flush=True)
    else:
        _run(cli + ["bench", "-q", "--suite", args.suite, "--seconds", args.seconds, "--json",
                    out / "layers.json", "--plot", out / "layers.png", "--markdown"], log,
             out / "layers.md")
    model_bench = [py, REPO / "benchmarks" / "cpu_model_bench.py", "--serq-w4a8", models["w4a8"],
                   "--serq-w4a4", models["w4a4"], "--float", float_model, "--text",
                   texts["prideprejudice"]]
    _run(model_bench + ["--reps", args.reps, "--json", out / "model.json", "--markdown"], log,
         out / "model.md")
    _run(model_bench + ["--profile", "--profile-variants", "float32,serq-w4a8,serq-w4a4"], log,
         out / "profile.txt")
    work = cache / "smollm2-135m" / "bench"  # where cpu_model_bench.py builds its baselines
    variants = [("float32", float_model.parent), ("serq-w4a8", models["w4a8"]),
                ("serq-w4a4", models["w4a4"]),
                ("matmulnbits-w4-g32-int8", work / "matmulnbits-w4-g32-acc4"),
                ("ort-int8", work / "ort-int8"),
                ("ort-int8-rr", work / "ort-int8-reduce-range")]
    for name, folder in variants:
        if not (folder / "model.onnx").is_file():
            print(f"== {name}: no model in {folder}, perplexity skipped", flush=True)
            continue
        js = out / f"ppl-{name}.json"
        _run(cli + ["eval", folder, "--text", texts["prideprejudice"], "--ctx", "1024",
                    "--max-tokens", "8192", "--last-word", "0", "-q", "--json", js], log)
    print(f"\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
