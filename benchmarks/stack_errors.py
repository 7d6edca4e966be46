"""How far each architecture and graph form's converted model lies from float and from the
PyTorch fake-quant: the table of ``models/RESULTS-stacks.md``.

Tiny random models (``serq_onnx.export.make_tiny_model``) exported by Optimum, or re-expressed
by onnxruntime's transformer optimizer, torch.onnx's dynamo exporter, an FP16 export and
onnxruntime-genai's model builder; each converted at w4a8 and w4a4 with the same calibration
tokens, its logits on one held-out sequence compared with

* the float model the form came from (the export itself), and
* ``serq_onnx.fakequant_torch``: the same quantization computed in PyTorch on the Hugging Face
  model, independently of the converter.

The figure is the relative RMS difference over all logits, ``||a - b|| / ||b||``
(``serq_onnx.compare.diff``). Run: ``python benchmarks/stack_errors.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = dict(rank=16, group_w=32, group_a=32)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
FORMS = ("optimum", "ort-optimizer-l1", "ort-optimizer-l2", "ort-optimizer-qwen3", "dynamo",
         "fp16", "genai-builder")


def _ids(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(n)]


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of one sequence from an empty cache, for graphs with or without a KV cache."""
    from serq_onnx import compare

    sess = compare.cpu_session(path, with_ops=True)  # also pins a builder graph's head size
    names = {i.name for i in sess.get_inputs()}
    if any(n.startswith("past_key_values.") for n in names):
        return compare.logits(sess, ids)
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
    return sess.run(["logits"], feeds)[0].astype(np.float64)


def _optimizer_form(src: Path, out: Path, model_type: str, level: int, cfg: dict) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    shutil.copytree(src.parent, out)
    optimize_model(str(src), model_type=model_type, num_heads=cfg["num_attention_heads"],
                   hidden_size=cfg["hidden_size"], opt_level=level).save_model_to_file(
        str(out / "model.onnx"))
    return out / "model.onnx"


def _builder_form(hf_dir: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"the genai builder failed:\n{run.stderr[-2000:]}")
    return out / "model.onnx"


def measure(work: Path) -> list[dict]:
    import torch

    from serq_onnx import compare
    from serq_onnx.converter import convert
    from serq_onnx.export import export_causal_lm, export_dynamo, make_tiny_model
    from serq_onnx.fakequant_torch import fakequant_logits

    rows = []

    def one(kind: str, name: str, hf_dir: Path, float_path: Path, calib, eval_ids):
        flt = _logits(float_path, eval_ids)
        for scheme in ("w4a8", "w4a4"):
            t = time.perf_counter()
            out = work / f"{kind}-{name}-{scheme}"
            report = convert(float_path, out, scheme=scheme, calib_ids=calib, progress=False,
                             log=lambda *a: None, **SETTINGS)
            got = _logits(out / "model.onnx", eval_ids)
            ref = fakequant_logits(hf_dir, [torch.as_tensor(s) for s in calib],
                                   torch.as_tensor(eval_ids)[None],
                                   bits_a=8 if scheme == "w4a8" else 4, bits_w=4,
                                   lm_head=report.config["lm_head"], **SETTINGS)
            ref = np.asarray(ref, np.float64).reshape(got.shape)
            rows.append(dict(kind=kind, name=name, scheme=scheme,
                             vs_float=compare.diff(got, flt).rel_rms,
                             vs_fakequant=compare.diff(got, ref).rel_rms,
                             top1_vs_fakequant=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                             attention=report.attention.split(";")[0],
                             seconds=time.perf_counter() - t))
            print(f"{kind:12s} {name:20s} {scheme}: vs float {rows[-1]['vs_float']:.4f}, "
                  f"vs fake-quant {rows[-1]['vs_fakequant']:.2e}", flush=True)

    for arch in ARCHS:
        hf = make_tiny_model(work / f"hf-{arch}", arch, seed=0)
        onnx_path = export_causal_lm(hf, work / f"onnx-{arch}")
        cfg = json.loads((hf / "config.json").read_text())
        calib = _ids(cfg["vocab_size"], 4, 48, seed=1)
        eval_ids = _ids(cfg["vocab_size"], 1, 40, seed=2)[0]
        one("architecture", arch, hf, onnx_path, calib, eval_ids)
        if arch != "llama":
            continue
        forms = {
            "ort-optimizer-l1": lambda: _optimizer_form(onnx_path, work / "opt1", "gpt2", 1, cfg),
            "ort-optimizer-l2": lambda: _optimizer_form(onnx_path, work / "opt2", "gpt2", 2, cfg),
            "ort-optimizer-qwen3": lambda: _optimizer_form(onnx_path, work / "optq", "qwen3", 0,
                                                           cfg),
            "dynamo": lambda: export_dynamo(hf, work / "dynamo", eval_ids),
            "fp16": lambda: export_causal_lm(hf, work / "onnx-fp16", dtype="fp16"),
            "genai-builder": lambda: _builder_form(hf, work / "builder"),
        }
        for name, make in forms.items():
            one("graph form", name, hf, make(), calib, eval_ids)
    return rows


def markdown(rows: list[dict], machine: str) -> str:
    lines = ["| kind | model | scheme | vs float | vs fake-quant | top-1 vs fake-quant | attention |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['name']} | {r['scheme']} | {r['vs_float']:.4f} | "
                     f"{r['vs_fakequant']:.1e} | {r['top1_vs_fakequant']:.1%} | "
                     f"{r['attention']} |")
    return f"Measured on {machine}.\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here "
                    "(default: print only)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    args = ap.parse_args()
    from serq_onnx.bench import machine_name

    with tempfile.TemporaryDirectory(prefix="serq-stacks-") as tmp:
        rows = measure(Path(tmp))
    text = markdown(rows, machine_name())
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
