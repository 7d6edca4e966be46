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
    # Defaults: SERQ rounds the main weight with GPTQ and searched group scales, the baselines to
    # nearest with absmax scales (as published); activation groups are 128 at w4a8, 32 at w4a4.
    # Rows marked otherwise change exactly that.
    "main": {
        "float32": None,
        "SERQ w4a8": "--scheme w4a8",
        "SERQ w4a4": "--scheme w4a4",
        "RTN w4a4": "--scheme w4a4 --method rtn",
        "SmoothQuant w4a4": "--scheme w4a4 --method smoothquant --alpha 0.5",
        "L2QER w4a4": "--scheme w4a4 --method l2qer",
        "RTN w4a8": "--scheme w4a8 --method rtn",
        "SmoothQuant w4a8": "--scheme w4a8 --method smoothquant --alpha 0.5",
        "L2QER w4a8": "--scheme w4a8 --method l2qer",
        "SERQ w4a8, main weight round to nearest": "--scheme w4a8 --weight-quant rtn",
        "SERQ w4a4, main weight round to nearest": "--scheme w4a4 --weight-quant rtn",
        "RTN w4a4 + GPTQ": "--scheme w4a4 --method rtn --weight-quant gptq",
        "SmoothQuant w4a4 + GPTQ": "--scheme w4a4 --method smoothquant --alpha 0.5 "
                                   "--weight-quant gptq",
        "L2QER w4a4 + GPTQ": "--scheme w4a4 --method l2qer --weight-quant gptq",
        "SERQ w4a4, activation groups of 128": "--scheme w4a4 --group-a 128",
        "RTN w4a4, activation groups of 128": "--scheme w4a4 --method rtn --group-a 128",
        "SmoothQuant w4a4, activation groups of 128": "--scheme w4a4 --method smoothquant "
                                                      "--alpha 0.5 --group-a 128",
        "L2QER w4a4, activation groups of 128": "--scheme w4a4 --method l2qer --group-a 128",
        "MatMulNBits w4 (onnxruntime, weight-only)": "nbits",
    },
    "ablation": {
        "SERQ w4a8, absmax weight scales": "--scheme w4a8 --weight-scale absmax",
        "SERQ w4a8, round to nearest, absmax weight scales": "--scheme w4a8 --weight-quant rtn "
                                                             "--weight-scale absmax",
        "flatten only w4a4 (rank 0)": "--scheme w4a4 --method flatten",
        "SERQ w4a4 rank 32": "--scheme w4a4 --rank 32",
        "SERQ w4a4 rank 64": "--scheme w4a4 --rank 64",
        "SERQ w4a4 rank 256": "--scheme w4a4 --rank 256",
        "SERQ w4a4, activation groups of 64": "--scheme w4a4 --group-a 64",
        "RTN w4a8, searched weight scales": "--scheme w4a8 --method rtn --weight-scale mse",
        "SmoothQuant w4a8, searched weight scales": "--scheme w4a8 --method smoothquant "
                                                    "--alpha 0.5 --weight-scale mse",
    },
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _run(cmd: str) -> float:
    print(f"$ {cmd}", flush=True)
    t = time.perf_counter()
    subprocess.run(shlex.split(cmd), check=True)
    return time.perf_counter() - t


def _markdown(table: list, base: float | None, cache: Path, exe: str) -> str:
    lines = ["| model | ppl | vs fp32 | last-word acc | convert s | command |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, res, cmds, convert_s in table:
        ppl = res["perplexity"]["ppl"]
        lw = res.get("last_word") or {}
        rel = f"{ppl / base - 1:+.1%}" if base else ""
        acc = f"{lw['accuracy']:.1%}" if lw else ""
        secs = f"{convert_s:.0f}" if convert_s is not None else ""
        shown = " && ".join(c.replace(str(cache), "$CACHE").replace(exe, "serq-onnx")
                            for c in cmds)
        lines.append(f"| {name} | {ppl:.3f} | {rel} | {acc} | {secs} | `{shown}` |")
    return "\n".join(lines)


def _float_ppl(table: list, out_root: Path) -> float | None:
    """The float model's perplexity: from this run's first row, else from an earlier run."""
    if table and table[0][3] is None and ROWS["main"].get(table[0][0], "") is None:
        return table[0][1]["perplexity"]["ppl"]
    js = out_root / f"{_slug('float32')}.json"
    return json.loads(js.read_text())["perplexity"]["ppl"] if js.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--rows", default="main", choices=[*ROWS, "all"])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--last-word", type=int, default=100)
    ap.add_argument("--only", help="row names to run, separated by ';'")
    ap.add_argument("--out", type=Path, help="also write the table here after every row")
    args = ap.parse_args(argv)

    from serq_onnx import data
    from serq_onnx.export import export_causal_lm

    cache = args.cache
    texts = data.austen_texts(cache)
    float_model = export_causal_lm(data.smollm2_hf_dir(cache), cache / "smollm2-135m" / "onnx-fp32")
    rows = {k: v for group in ROWS for k, v in ROWS[group].items()
            if args.rows in ("all", group)}
    if args.only:
        wanted = [name.strip() for name in args.only.split(";")]
        unknown = [name for name in wanted if name not in rows]
        if unknown:
            ap.error(f"unknown rows {unknown}; choose from {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in wanted}
    exe = f"{Path(sys.executable).parent}/serq-onnx"
    out_root = cache / "smollm2-135m" / "results"
    table = []
    for name, flags in rows.items():
        out = out_root / _slug(name)
        convert_cmd = None
        if flags == "nbits":
            convert_cmd = f"{exe} nbits {float_model} -o {out} --overwrite -q"
            model_dir = out
        elif flags:
            convert_cmd = (f"{exe} convert {float_model} -o {out} {flags} "
                           f"--calib {texts[CALIB]} {COMMON}")
            model_dir = out
        else:
            model_dir = float_model.parent
        js = out_root / f"{_slug(name)}.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        eval_cmd = (f"{exe} eval {model_dir} --text {texts[EVAL]} --ctx 1024 "
                    f"--max-tokens {args.max_tokens} --last-word {args.last_word} --json {js} -q")
        convert_s = _run(convert_cmd) if convert_cmd else None
        _run(eval_cmd)
        res = json.loads(js.read_text())
        table.append((name, res, [c for c in (convert_cmd, eval_cmd) if c], convert_s))
        print(f"{name}: ppl {res['perplexity']['ppl']:.3f}", flush=True)
        if args.out:
            args.out.write_text(_markdown(table, _float_ppl(table, out_root), cache, exe) + "\n")

    print()
    print(_markdown(table, _float_ppl(table, out_root), cache, exe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
