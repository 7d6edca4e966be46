"""Models the GPU check carries: small enough to travel in one device call.

* ``smollm2-shaped``: SmolLM2-135M's exact config (30 layers, hidden 576, vocab 49152) with
  weights built from one small tiled block, the same in every layer. Speed does not depend on
  weight values, and repeated blocks compress to almost nothing, so the FP16 export and its
  SERQ conversion fit beside the working tree. Its logits mean nothing; it is for timing only.
* ``tiny-llama``: the suite's tiny random Llama as an FP16 Optimum export and its w4a8
  conversion, for CUDA-vs-CPU logits on the GPU machine (which has no Optimum to export one).

``python scripts/gpu_models.py OUT_DIR [--smollm2-config CONFIG_JSON]`` writes
``OUT_DIR/{smollm2-shaped,tiny-llama}/{fp16,serq-w4a8}/`` (reused when present).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

TILE = 64  # side of the block every weight matrix is tiled from
CALIB = dict(samples=2, seqlen=64)


def _tiled(shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """A ``TILE x TILE`` random block repeated over ``shape`` (2-D), scaled to ``std``."""
    block = rng.standard_normal((TILE, TILE)).astype(np.float32) * std
    reps = [-(-s // TILE) for s in shape]
    return np.tile(block, reps)[: shape[0], : shape[1]]


def make_shaped_hf(config_json: Path, out: Path, seed: int = 0) -> Path:
    """A ``LlamaForCausalLM`` of ``config_json``'s shape with tiled weights, saved to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    cfg = json.loads(Path(config_json).read_text())
    cfg.pop("_model_name_or_path", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    layer_weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            key = name.split("layers.", 1)[-1].split(".", 1)[-1] if "layers." in name else name
            if key not in layer_weights:
                rng = np.random.default_rng(seed + len(layer_weights))
                # A tiled matrix's gain is (rows/TILE * cols/TILE)^0.5 times its block's: scale
                # the block so each layer's gain stays below one and FP16 activations stay small.
                reps = np.sqrt(p.shape[0] * p.shape[1]) / TILE
                std = 0.02 if "embed" in name else 0.25 / (np.sqrt(TILE) * reps)
                layer_weights[key] = torch.from_numpy(_tiled(tuple(p.shape), rng, std))
            p.copy_(layer_weights[key])
            # One element per layer differs, so the exporter does not merge the layers' weights
            # into one shared initializer (the converter needs one weight per linear).
            p[0, 0] += 1e-3 * (i + 1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def export_and_convert(hf_dir: Path, root: Path, vocab: int, *, rank: int, group_w: int,
                       group_a: int, log=print) -> dict[str, Path]:
    """FP16 Optimum export of ``hf_dir`` into ``root/fp16`` and its w4a8 SERQ conversion into
    ``root/serq-w4a8`` (round to nearest, absmax scales, two short calibration sequences:
    enough for valid codes, and fast)."""
    from serq_onnx.converter import convert
    from serq_onnx.export import export_causal_lm

    fp16 = export_causal_lm(hf_dir, root / "fp16", dtype="fp16")
    serq = root / "serq-w4a8"
    if not (serq / "model.onnx").is_file():
        rng = np.random.default_rng(1)
        calib = [rng.integers(0, vocab, size=CALIB["seqlen"], dtype=np.int64)
                 for _ in range(CALIB["samples"])]
        convert(fp16, serq, scheme="w4a8", calib_ids=calib, rank=rank, group_w=group_w,
                group_a=group_a, weight_quant="rtn", weight_scale="absmax", verify=False,
                progress=False, log=lambda *a: None)
    for d in (root / "fp16", serq):  # the check reads only model.onnx (+ data) and config.json
        for f in d.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                             "chat_template.jinja"):
                f.unlink()
    log(f"  {root.name}: {_size(root / 'fp16')} MB fp16, {_size(serq)} MB serq-w4a8")
    return {"fp16": fp16, "serq": serq / "model.onnx"}


def _size(d: Path) -> str:
    return f"{sum(f.stat().st_size for f in d.rglob('*') if f.is_file()) / 2**20:.1f}"


def build(out: Path, smollm2_config: Path | None, log=print) -> None:
    from serq_onnx.export import make_tiny_llama

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = lambda name: (out / name / "serq-w4a8" / "model.onnx").is_file()  # noqa: E731
    tiny_hf = out / "_hf" / "tiny-llama"
    if not done("tiny-llama"):
        make_tiny_llama(tiny_hf, seed=0)
        vocab = json.loads((tiny_hf / "config.json").read_text())["vocab_size"]
        export_and_convert(tiny_hf, out / "tiny-llama", vocab, rank=32, group_w=32, group_a=32,
                           log=log)
    if smollm2_config is not None and not done("smollm2-shaped"):
        hf = make_shaped_hf(smollm2_config, out / "_hf" / "smollm2-shaped")
        vocab = json.loads(Path(smollm2_config).read_text())["vocab_size"]
        export_and_convert(hf, out / "smollm2-shaped", vocab, rank=128, group_w=128,
                           group_a=128, log=log)
    shutil.rmtree(out / "_hf", ignore_errors=True)
    log(f"  models built in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--smollm2-config", type=Path, default=None,
                   help="SmolLM2-135M's config.json (omit: tiny Llama only)")
    a = p.parse_args(argv)
    build(a.out, a.smollm2_config)


if __name__ == "__main__":
    main()
