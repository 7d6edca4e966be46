"""FP16 exports (Optimum ``--dtype fp16``) convert and keep their activations in FP16."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import serq_onnx
from serq_onnx import compare
from serq_onnx.converter import convert

SETTINGS = dict(rank=32, group_w=32, group_a=32, progress=False, log=lambda *a: None)


def _ids(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(n)]


@pytest.fixture(scope="module")
def ids(tiny_llama_fp16):
    vocab = json.loads((tiny_llama_fp16.hf_dir / "config.json").read_text())["vocab_size"]
    return _ids(vocab, 4, 64, seed=1), _ids(vocab, 1, 48, seed=2)[0]


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
def test_fp16_export_converts_with_fp16_activations(tiny_llama_fp16, tiny_llama, ids, scheme,
                                                    tmp_path):
    calib_ids, eval_ids = ids
    report = convert(tiny_llama_fp16.onnx_path, tmp_path / "fp16", scheme=scheme,
                     calib_ids=calib_ids, **SETTINGS)
    # The op check ran every node on the activations the graph gives it: FP16 (Optimum's CPU
    # export keeps attention, hence o_proj's input and weight, in float32), and no casts were
    # added to the linear layers: the one Cast in front of o_proj is the fused attention's,
    # restoring the export's own float32 boundary after the FP16 GroupQueryAttention.
    assert "on float16/float32 activations" in report.op_check
    model = ir.load(tmp_path / "fp16" / "model.onnx")
    serq = [n for n in model.graph if n.op_type == "SerqMatMul"]
    casts = [n for n in serq if n.inputs[0].producer().op_type == "Cast"]
    assert serq and all("o_proj" in n.name and n.inputs[0].producer().inputs[0].producer().op_type
                        == "GroupQueryAttention" for n in casts)
    for n in serq:
        for i in (1, 2, 3):  # the weights are the op's own format, whatever the model's dtype
            assert n.inputs[i].const_value.dtype in (ir.DataType.UINT8, ir.DataType.FLOAT,
                                                     ir.DataType.INT32)
        if len(n.inputs) > 4 and n.inputs[4] is not None:
            assert n.inputs[4].const_value.dtype == ir.DataType.FLOAT  # act_scale

    # As accurate as the same conversion of the float32 export, each against its own float
    # model (the two quantize slightly different activations, so their codes differ).
    ref32 = convert(tiny_llama.onnx_path, tmp_path / "fp32", scheme=scheme,
                    calib_ids=calib_ids, **SETTINGS)
    assert ref32.layers_converted == report.layers_converted
    got16 = compare.logits(serq_onnx.session(tmp_path / "fp16" / "model.onnx"), eval_ids)
    got32 = compare.logits(serq_onnx.session(tmp_path / "fp32" / "model.onnx"), eval_ids)
    flt16 = compare.logits(compare.cpu_session(tiny_llama_fp16.onnx_path), eval_ids)
    flt32 = compare.logits(compare.cpu_session(tiny_llama.onnx_path), eval_ids)
    err16, err32 = compare.diff(got16, flt16), compare.diff(got32, flt32)
    assert err16.rel_rms < 1.5 * err32.rel_rms, (err16, err32)
    assert compare.diff(flt16, flt32).rel_rms < 0.01  # the export itself is faithful
