"""Accuracy table for SmolLM2-135M: every row is one ``serq-onnx`` command pair, run as written.

    .venv/bin/python benchmarks/smollm2_results.py --rows main [--cache .cache]

fetches the model and text if needed, exports the float model, then for each row runs the
convert command (if any) and ``serq-onnx eval ... --json``, and prints a markdown table whose
rows carry their commands. Calibration text (Emma) and evaluation text (Pride and Prejudice)
are different novels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

CALIB = "emma"
EVAL = "prideprejudice"
COMMON = "--calib-samples 32 --calib-seqlen 512 -q --overwrite"

# name -> convert flags ("" = the float model; "nbits" = onnxruntime's MatMulNBits)
ROWS = {
    "main": {
        "float32": None,
        "MatMulNBits w4 (onnxruntime, weight-only)": "nbits",
        "RTN w4a8": "--scheme w4a8 --method rtn",
        "SmoothQuant w4a8": "--scheme w4a8 --method smoothquant --alpha 0.5",
        "L2QER w4a8": "--scheme w4a8 --method l2qer",
        "SERQ w4a8": "--scheme w4a8",
        "SERQ w4a8 + GPTQ": "--scheme w4a8 --weight-quant gptq",
        "RTN w4a4": "--scheme w4a4 --method rtn",
        "SmoothQuant w4a4": "--scheme w4a4 --method smoothquant --alpha 0.5",
        "L2QER w4a4": "--scheme w4a4 --method l2qer",
        "SERQ w4a4": "--scheme w4a4",
        "SERQ w4a4 + GPTQ": "--scheme w4a4 --weight-quant gptq",
    },
    "ablation": {
        "flatten only w4a4 (rank 0)": "--scheme w4a4 --method flatten",
        "SERQ w4a4 rank 32": "--scheme w4a4 --rank 32",
        "SERQ w4a4 rank 64": "--scheme w4a4 --rank 64",
        "SERQ w4a4 rank 256": "--scheme w4a4 --rank 256",
        "SERQ w4a4 group_a 64": "--scheme w4a4 --group-a 64",
        "SERQ w4a4 group_a 32": "--scheme w4a4 --group-a 32",
        "SERQ w4a8 group_w 64": "--scheme w4a8 --group-w 64",
    },
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _run(cmd: str) -> float:
    print(f"$ {cmd}", flush=True)
    t = time.perf_counter()
    subprocess.run(shlex.split(cmd), check=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--rows", default="main", choices=[*ROWS, "all"])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--last-word", type=int, default=100)
    ap.add_argument("--only", help="comma-separated row names to run")
    args = ap.parse_args(argv)

    from serq_onnx import data
    from serq_onnx.export import export_causal_lm

    cache = args.cache
    texts = data.austen_texts(cache)
    float_model = export_causal_lm(data.smollm2_hf_dir(cache), cache / "smollm2-135m" / "onnx-fp32")
    rows = {k: v for group in ROWS for k, v in ROWS[group].items()
            if args.rows in ("all", group)}
    if args.only:
        rows = {k: v for k, v in rows.items() if k in args.only.split(",")}
    exe = f"{Path(sys.executable).parent}/serq-onnx"
    out_root = cache / "smollm2-135m" / "results"
    table = []
    for name, flags in rows.items():
        out = out_root / _slug(name)
        cmds = []
        if flags == "nbits":
            cmds.append(f"{exe} nbits {float_model} -o {out} --overwrite -q")
            model_dir = out
        elif flags:
            cmds.append(f"{exe} convert {float_model} -o {out} {flags} "
                        f"--calib {texts[CALIB]} {COMMON}")
            model_dir = out
        else:
            model_dir = float_model.parent
        js = out_root / f"{_slug(name)}.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        cmds.append(f"{exe} eval {model_dir} --text {texts[EVAL]} --ctx 1024 "
                    f"--max-tokens {args.max_tokens} --last-word {args.last_word} --json {js} -q")
        seconds = sum(_run(c) for c in cmds)
        res = json.loads(js.read_text())
        table.append((name, res, cmds, seconds))
        print(f"{name}: ppl {res['perplexity']['ppl']:.3f}", flush=True)

    base = table[0][1]["perplexity"]["ppl"] if table and rows.get(table[0][0]) is None else None
    print()
    print("| model | ppl | vs fp32 | last-word acc | command |")
    print("| --- | --- | --- | --- | --- |")
    for name, res, cmds, _ in table:
        ppl = res["perplexity"]["ppl"]
        lw = res.get("last_word") or {}
        rel = f"{ppl / base - 1:+.1%}" if base else ""
        acc = f"{lw['accuracy']:.1%}" if lw else ""
        shown = " && ".join(c.replace(str(cache), "$CACHE").replace(exe, "serq-onnx")
                            for c in cmds)
        print(f"| {name} | {ppl:.3f} | {rel} | {acc} | `{shown}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
