"""Random-weight Llamas of a chosen size, exported with Optimum, for conversion-scale tests.

    .venv/bin/python scripts/make_synthetic_llama.py 0.5b /tmp/llama-0.5b

writes ``/tmp/llama-0.5b/hf`` (``save_pretrained``, the tiny byte-level tokenizer) and
``/tmp/llama-0.5b/onnx/model.onnx`` (Optimum, float32; over 2 GB its weights go to external
data, as Optimum writes them). No training: the weights are ``transformers``' initialisation,
so the sizes, shapes and memory of a conversion are those of a real model of that size while
its accuracy means nothing. ``--hf-only`` skips the export; ``--no-validate`` skips Optimum's
comparison of the export with PyTorch (time; the export's peak memory is its serialization);
``--dtype fp16`` exports in half precision (into ``onnx-fp16/``), as Optimum's GPU exports are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Llama-shaped configs (untied 32000-token head, as Llama 2): 4 h^2 + 3 h i weights per layer.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
}


def param_count(hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                num_attention_heads: int, num_key_value_heads: int, vocab_size: int) -> int:
    """Parameters of an untied Llama of these sizes (norms included)."""
    head = hidden_size // num_attention_heads
    attn = 2 * hidden_size * hidden_size + 2 * hidden_size * num_key_value_heads * head
    mlp = 3 * hidden_size * intermediate_size
    layer = attn + mlp + 2 * hidden_size
    return num_hidden_layers * layer + 2 * vocab_size * hidden_size + hidden_size


def make(size: str, out: Path, export: bool = True, validate: bool = True,
         dtype: str = "fp32") -> Path:
    """Save the random Llama ``size`` under ``out/hf`` and, with ``export``, its ONNX export
    in ``dtype`` under ``out/onnx`` (``out/onnx-fp16`` for fp16; checked against PyTorch with
    ``validate``); returns the model file (or the HF folder)."""
    from serq_onnx.export import export_causal_lm, make_tiny_model

    hf = out / "hf"
    if not (hf / "config.json").is_file():
        make_tiny_model(hf, "llama", seed=0, **SIZES[size])
    if not export:
        return hf
    folder = out / ("onnx" if dtype == "fp32" else f"onnx-{dtype}")
    return export_causal_lm(hf, folder, validate=validate, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("size", choices=sorted(SIZES), help="model size")
    p.add_argument("out", type=Path, help="output folder (hf/ and onnx/ go inside)")
    p.add_argument("--hf-only", action="store_true",
                   help="save the PyTorch model only (default: also export)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip Optimum's check of the export against PyTorch")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="the export's weights and activations (default fp32)")
    args = p.parse_args(argv)
    n = param_count(**SIZES[args.size])
    print(f"{args.size}: {n / 1e9:.3f} B parameters, {4 * n / 2**30:.2f} GiB in float32",
          file=sys.stderr)
    print(make(args.size, args.out, export=not args.hf_only, validate=not args.no_validate,
               dtype=args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
