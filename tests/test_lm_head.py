"""``lm_head="int8"``: the LM head becomes a SerqMatMul with 8-bit weights and activations."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import serq_onnx
from serq_onnx import SerqError, compare
from serq_onnx.converter import convert

SMALL = dict(rank=16, group_w=32, group_a=32, calib_samples=2, calib_seqlen=32,
             progress=False, log=lambda *a: None)


def _nodes(path):
    model = ir.load(path)
    return model, {n.name: n for n in model.graph if n.op_type == "SerqMatMul"}


def test_int8_lm_head(tiny_llama, tmp_path):
    report = convert(tiny_llama.onnx_path, tmp_path / "head", lm_head="int8", **SMALL)
    base = convert(tiny_llama.onnx_path, tmp_path / "base", lm_head="float", **SMALL)
    assert report.layers_by_role.get("lm_head") == 1 and "lm_head" not in base.layers_by_role
    model, nodes = _nodes(tmp_path / "head" / "model.onnx")
    head = nodes["/lm_head/SerqMatMul"]
    attrs = {k: a.value for k, a in head.attributes.items()}
    assert (attrs["bits_w"], attrs["bits_a"], attrs["rank"]) == (8, 8, 0)
    assert head.outputs[0] in model.graph.outputs and head.outputs[0].name == "logits"
    assert "/lm_head/SerqMatMul" in report.op_check or "equal the reference" in report.op_check
    # 8-bit codes are a quarter of the float bytes (plus scales and sums: 0.69 saved at K=64)
    V, K = (int(d) for d in reversed(tuple(head.inputs[1].const_value.shape)))
    assert report.bytes_after < base.bytes_after - 0.6 * 4 * K * V
    # the int8 head changes the logits far less than the 4-bit body did
    ids = np.arange(1, 40, dtype=np.int64)
    flt = compare.logits(compare.cpu_session(tiny_llama.onnx_path), ids)
    got_head = compare.logits(serq_onnx.session(tmp_path / "head" / "model.onnx"), ids)
    got_base = compare.logits(serq_onnx.session(tmp_path / "base" / "model.onnx"), ids)
    head_only, body = compare.diff(got_head, got_base), compare.diff(got_base, flt)
    assert head_only.rel_rms < 0.5 * body.rel_rms, (head_only, body)


def test_unknown_lm_head_mode(tiny_llama, tmp_path):
    with pytest.raises(SerqError, match="--lm-head"):
        convert(tiny_llama.onnx_path, tmp_path / "x", lm_head="int4", **SMALL)


def test_int8_head_without_a_constant_weight_is_refused(tmp_path):
    import onnx
    import onnx.parser
    from onnx import numpy_helper

    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 18]>
    g (float[1, 2, 8] x, float[8, 5] w) => (float[1, 2, 5] logits, float[1, 2, 6] y) {
      logits = MatMul(x, w)
      h = MatMul(x, W)
      y = Relu(h)
    }""")
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((8, 6), np.float32), "W"))
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    with pytest.raises(SerqError, match="--lm-head int8: the model's logits"):
        convert(path, tmp_path / "out", lm_head="int8", **SMALL)
    assert not (tmp_path / "out").exists()
