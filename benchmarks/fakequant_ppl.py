"""Perplexity of SmolLM2-135M under the PyTorch fake-quant (``serq_onnx.fakequant_torch``).

The independent implementation of every method, run on the same calibration and evaluation
tokens as the ONNX rows of ``smollm2_results.py``: an ONNX row and its fake-quant row differing
by more than float noise means one of the two implementations is wrong.

    .venv/bin/python benchmarks/fakequant_ppl.py serq:w4a8:rtn serq:w4a4:gptq rtn:w4a8:rtn ...

Each config is ``method:scheme:weight_quant[:key=value...]`` (keys: rank, group_w, group_a,
alpha, weight_scale); ``float`` evaluates the float model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np


def perplexity(model, ids: np.ndarray, ctx: int) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            w = torch.as_tensor(ids[start:start + ctx])[None]
            if w.shape[1] < 2:
                continue
            logits = model(w, use_cache=False).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return math.exp(nll / n)


def _onnx_stats(model_path: Path, calib: list) -> dict:
    """absmax and per-token Hessians keyed by torch module name, from the ONNX CalibratePass."""
    import torch

    from serq_onnx import passes
    from serq_onnx.modelio import load_model
    from serq_onnx.plan import ConvertConfig, Plan

    plan = Plan(ConvertConfig(weight_quant="gptq"))
    model = load_model(model_path)
    passes.FindTargetsPass(plan)(model)
    passes.CalibratePass(plan, calib)(model)
    absmax, hessians = {}, {}
    for group in plan.groups:
        h = torch.as_tensor(group.gram / max(group.tokens, 1))
        for t in group.targets:
            absmax[f"model.{t.name}"] = torch.as_tensor(group.absmax)
            hessians[f"model.{t.name}"] = h
    return {"absmax": absmax, "hessians": hessians}


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    from serq_onnx import data
    from serq_onnx.calibration import split_sequences, tokenize_file
    from serq_onnx.export import export_causal_lm
    from serq_onnx.fakequant_torch import apply_serq_fakequant

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--onnx-stats", action="store_true",
                    help="quantize from the calibration statistics (absmax, Gram matrices) that "
                    "the ONNX converter's own CalibratePass measures on the same tokens, so that "
                    "both implementations start from identical numbers")
    args = ap.parse_args(argv)

    hf_dir = data.smollm2_hf_dir(args.cache)
    texts = data.austen_texts(args.cache)
    tok_dir = export_causal_lm(hf_dir, args.cache / "smollm2-135m" / "onnx-fp32").parent
    calib = split_sequences(tokenize_file(tok_dir, texts["emma"],
                                          args.calib_samples * args.calib_seqlen),
                            args.calib_samples, args.calib_seqlen)
    ids = tokenize_file(tok_dir, texts["prideprejudice"], args.max_tokens)
    calib_t = [torch.as_tensor(c) for c in calib]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, attn_implementation="eager").float().eval()

    stats = _onnx_stats(tok_dir / "model.onnx", calib) if args.onnx_stats else {}

    for spec in args.configs:
        t = time.perf_counter()
        model = load()
        if spec != "float":
            method, scheme, wq, *extra = spec.split(":")
            kw = {k: (float(v) if k == "alpha" else v if k == "weight_scale" else int(v))
                  for k, v in (e.split("=") for e in extra)}
            if "alpha" in kw:
                kw["smooth_alpha"] = kw.pop("alpha")
            bits_a = {"w4a8": 8, "w4a4": 4}[scheme]
            apply_serq_fakequant(model, calib_t, bits_a=bits_a, bits_w=4, method=method,
                                 weight_quant=wq, **stats, **kw)
        ppl = perplexity(model, ids, args.ctx)
        print(f"{spec}\tppl {ppl:.4f}\t({len(ids)} tokens, {time.perf_counter() - t:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
