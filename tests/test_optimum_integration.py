"""A converted model runs inside Optimum's ORTModelForCausalLM, as users deploy it."""

from __future__ import annotations

import numpy as np
import pytest

import serq_onnx
from serq_onnx.converter import convert
from serq_onnx.evaluate import decode_speed

torch = pytest.importorskip("torch")
ort_models = pytest.importorskip("optimum.onnxruntime")


def test_generate_with_ortmodel(tiny_llama, tmp_path):
    rng = np.random.default_rng(0)
    vocab = tiny_llama.config["vocab_size"]
    calib = [rng.integers(0, vocab, 64, dtype=np.int64) for _ in range(2)]
    convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib, rank=32, group_w=32,
            group_a=32, progress=False)
    model = ort_models.ORTModelForCausalLM.from_pretrained(
        tmp_path / "out", session_options=serq_onnx.session_options(), use_cache=True,
        use_io_binding=False)
    prompt = rng.integers(3, vocab, 12, dtype=np.int64)
    out = model.generate(torch.as_tensor(prompt)[None], attention_mask=torch.ones(1, 12,
                         dtype=torch.long), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    new = out[0, 12:].tolist()
    # The same converted model, driven by our own KV-cache loop, must pick the same tokens.
    ours = decode_speed(tmp_path / "out" / "model.onnx", prompt, new_tokens=10,
                        warmup=False)["tokens"]
    assert new == ours
