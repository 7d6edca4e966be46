"""down_proj's flattening folds into up (and its permutation into gate and up) for every gated
MLP whose product is ``act(gate) * up`` with ``act`` elementwise: separate projections, a fused
gate_up projection cut by Slice (Phi-3) or Split, a tanh-GELU built from Mul/Tanh (Gemma2); and
only there. Also the labels of fused projections and what an unknown layout is told."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from serq_onnx import SerqError, passes
from serq_onnx.plan import ConvertConfig, Plan

ort = pytest.importorskip("onnxruntime")

K, F = 8, 10  # hidden, MLP width
HEADER = '<ir_version: 10, opset_import: ["" : 18]>'


def _model(body: str, inputs: str = f"float[2, 3, {K}] x", **weights: np.ndarray) -> ir.Model:
    text = HEADER + f"\ng ({inputs}) => (float[2, 3, {K}] y) {{\n{body}\n}}"
    proto = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
    return ir.serde.deserialize_model(proto)


def _w(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    data = ir.serde.serialize_model(model).SerializeToString()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _x() -> np.ndarray:
    x = np.random.default_rng(2).standard_normal((2, 3, K)).astype(np.float32)
    x[..., 3] *= 25
    return x


def _convert_float(model: ir.Model, config: ConvertConfig | None = None) -> Plan:
    """FindTargets, then the folds with calibration-like statistics (outlier channels)."""
    plan = Plan(config or ConvertConfig())
    passes.FindTargetsPass(plan)(model)
    rng = np.random.default_rng(1)
    for g in plan.groups:
        g.absmax = rng.uniform(0.1, 2.0, g.K).astype(np.float32)
        g.absmax[rng.integers(0, g.K, 2)] *= 30
    passes.FoldFlatteningPass(plan)(model)
    passes.PermuteWeightsPass(plan)(model)
    return plan


def _down(plan: Plan):
    return next(g for g in plan.groups if g.targets[0].name.endswith("down_proj"))


# Phi-3 as Optimum exports it: the halves' bounds computed from Shape(gate_up)[-1].
PHI3_MLP = """
  gu = MatMul(x, Wgu)
  sh = Shape(gu)
  m1 = Constant <value = int64[1] {-1}> ()
  last = Gather <axis = 0> (sh, m1)
  z = Constant <value = int64[1] {0}> ()
  one = Constant <value = int64[1] {1}> ()
  two = Constant <value = int64[1] {2}> ()
  p = Add(last, one)
  half = Div(p, two)
  e0 = Mul(half, one)
  e1 = Mul(half, two)
  gate = Slice(gu, z, e0, m1)
  up = Slice(gu, e0, e1, m1)
  sg = Sigmoid(gate)
  act = Mul(gate, sg)
  prod = Mul(up, act)
  d = MatMul(prod, Wd)
  y = Identity(d)
"""


def _named(model: ir.Model) -> ir.Model:
    """Exporter-style node names, so the roles are read from them."""
    for node in model.graph:
        w = node.inputs[1] if node.op_type == "MatMul" else None
        proj = {"Wgu": "gate_up_proj", "Wg": "gate_proj", "Wu": "up_proj", "Wd": "down_proj",
                "Wqkv": "qkv_proj"}.get(w.name if w is not None else "")
        if proj:
            section = "self_attn" if proj == "qkv_proj" else "mlp"
            node.name = f"/model/layers.0/{section}/{proj}/MatMul"
    return model


def test_fused_gate_up_cut_by_slice_folds_into_the_up_half():
    model = _named(_model(PHI3_MLP, Wgu=_w(0, K, 2 * F), Wd=_w(1, F, K)))
    w_before = model.graph.initializers["Wgu"].const_value.numpy().copy()
    before = _run(model, _x())
    plan = _convert_float(model)
    down = _down(plan)
    assert down.kind == "mlp_act" and down.gate is down.up
    assert (down.gate_cols, down.up_cols) == ((0, F), (F, 2 * F))
    assert down.folded == ["scale->up", "perm->gate,up"] and down.runtime_reason == ""
    assert down.up.role == "gate_up" and down.up.name == "layers.0.mlp.gate_up_proj"
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)
    # Only the up half's columns are divided by down's s; both halves are permuted by down's
    # order within themselves. (Then the rows take the gate_up input group's s and order.)
    inv = (1 / down.s)[down.perm]
    rows = next(g for g in plan.groups if g.targets[0] is down.up)
    expect = np.concatenate([w_before[:, :F][:, down.perm],
                             w_before[:, F:][:, down.perm] * inv[None, :]], axis=1)
    expect = (rows.s[:, None] * expect)[rows.perm]
    np.testing.assert_allclose(model.graph.initializers["Wgu"].const_value.numpy(), expect,
                               rtol=1e-6)


def test_fused_gate_up_cut_by_split_folds():
    body = PHI3_MLP.split("  sh = ")[0] + """
  sizes = Constant <value = int64[2] {10, 10}> ()
  gate, up = Split <axis = -1> (gu, sizes)
  sg = Sigmoid(gate)
  act = Mul(gate, sg)
  prod = Mul(act, up)
  d = MatMul(prod, Wd)
  y = Identity(d)
"""
    model = _named(_model(body, Wgu=_w(0, K, 2 * F), Wd=_w(1, F, K)))
    before = _run(model, _x())
    down = _down(_convert_float(model))
    assert (down.gate_cols, down.up_cols) == ((0, F), (F, 2 * F))
    assert down.folded == ["scale->up", "perm->gate,up"]
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)


# Gemma2's gelu_pytorch_tanh as Optimum exports it.
GELU_TANH_MLP = """
  gt = MatMul(x, Wg)
  m0 = Mul(gt, gt)
  m1 = Mul(gt, m0)
  c0 = Constant <value = float {0.044715}> ()
  m2 = Mul(c0, m1)
  a0 = Add(gt, m2)
  c1 = Constant <value = float {0.7978846}> ()
  m3 = Mul(c1, a0)
  t = Tanh(m3)
  c2 = Constant <value = float {1.0}> ()
  a1 = Add(c2, t)
  m4 = Mul(gt, a1)
  c3 = Constant <value = float {0.5}> ()
  act = Mul(c3, m4)
  up = MatMul(x, Wu)
  prod = Mul(act, up)
  d = MatMul(prod, Wd)
  y = Identity(d)
"""


def test_tanh_gelu_mlp_folds_into_up_and_gate():
    model = _named(_model(GELU_TANH_MLP, Wg=_w(0, K, F), Wu=_w(1, K, F), Wd=_w(2, F, K)))
    before = _run(model, _x())
    down = _down(_convert_float(model))
    assert down.kind == "mlp_act" and down.gate.role == "gate" and down.up.role == "up"
    assert down.gate_cols is None and down.up_cols is None
    assert down.folded == ["scale->up", "perm->gate,up"]
    assert {n.op_type for n in down.mlp_nodes} == {"Mul", "Add", "Tanh"}
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)


def test_per_channel_constant_in_the_activation_is_not_folded():
    """``gate * c`` with a vector ``c`` does not commute with a permutation: run time."""
    body = """
  gt = MatMul(x, Wg)
  act = Mul(gt, c)
  up = MatMul(x, Wu)
  prod = Mul(act, up)
  d = MatMul(prod, Wd)
  y = Identity(d)
"""
    model = _named(_model(body, Wg=_w(0, K, F), Wu=_w(1, K, F), Wd=_w(2, F, K),
                          c=np.linspace(0.5, 2, F, dtype=np.float32)))
    before = _run(model, _x())
    down = _down(_convert_float(model))
    assert down.kind == "runtime" and "act(gate) * up" in down.runtime_reason
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)


def test_gate_half_read_elsewhere_falls_back_to_run_time():
    body = PHI3_MLP.replace("  y = Identity(d)", "  gs = ReduceSum <keepdims = 1> (gate, m1)\n"
                            "  y = Add(d, gs)")
    model = _named(_model(body, Wgu=_w(0, K, 2 * F), Wd=_w(1, F, K)))
    before = _run(model, _x())
    down = _down(_convert_float(model))
    assert down.kind == "mlp_act" and down.folded == []
    assert down.runtime_reason.startswith("act(gate) * up: ") and "used elsewhere" in (
        down.runtime_reason)
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)


def test_fused_qkv_is_labelled_qkv():
    body = """
  qkv = MatMul(x, Wqkv)
  s = Slice(qkv, z, e, m1)
  y = Add(s, x)
"""
    model = _named(_model(body, Wqkv=_w(0, K, 3 * K), z=np.array([0]), e=np.array([K]),
                          m1=np.array([-1])))
    plan = Plan(ConvertConfig())
    passes.FindTargetsPass(plan)(model)
    (t,) = plan.targets
    assert (t.role, t.name) == ("qkv", "layers.0.self_attn.qkv_proj")


def test_layers_pattern_keeps_the_others_float_and_still_folds_into_them():
    model = _named(_model(GELU_TANH_MLP, Wg=_w(0, K, F), Wu=_w(1, K, F), Wd=_w(2, F, K)))
    before = _run(model, _x())
    plan = _convert_float(model, ConvertConfig(layers="down_proj$"))
    assert [t.name for t in plan.targets] == ["layers.0.mlp.down_proj"]
    assert plan.left_float == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    # gate and up stay float MatMuls, but their weights still take down's s and permutation.
    assert _down(plan).folded == ["scale->up", "perm->gate,up"]
    np.testing.assert_allclose(_run(model, _x()), before, rtol=1e-4, atol=1e-4)


def test_layers_pattern_that_matches_nothing_names_the_labels():
    model = _named(_model(GELU_TANH_MLP, Wg=_w(0, K, F), Wu=_w(1, K, F), Wd=_w(2, F, K)))
    with pytest.raises(SerqError, match=r"--layers 'attn' matches none of the 3 linear layers "
                       r"\(labels: layers.0.mlp.gate_proj, layers.0.mlp.up_proj, "):
        passes.FindTargetsPass(Plan(ConvertConfig(layers="attn")))(model)
    with pytest.raises(SerqError, match="not a regular expression"):
        ConvertConfig(layers="[")


def test_unknown_layout_names_what_was_not_recognised():
    body = """
  wq = DequantizeLinear(Wq, sc)
  h = MatMul(x, wq)
  wt = Transpose <perm = [1, 0]> (Wt)
  y = MatMul(h, wt)
"""
    model = _model(body, Wq=np.ones((K, K), np.int8), sc=np.array(0.1, np.float32),
                   Wt=_w(0, K, K))
    with pytest.raises(SerqError, match="no linear layers found.*not recognised: ") as err:
        passes.FindTargetsPass(Plan(ConvertConfig()))(model)
    assert "1 x MatMul whose weight is a Transpose of an initializer" in str(err.value)
    assert "1 x MatMul with a DequantizeLinear weight (already quantized)" in str(err.value)


def test_only_an_lm_head_is_no_decoder():
    text = HEADER + f"""
g (float[2, {K}] x) => (float[2, {F}] logits) {{
  n = Relu(x)
  logits = MatMul(n, W)
}}"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(numpy_helper.from_array(_w(0, K, F), "W"))
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(SerqError, match=r"no decoder linear layers found \(only the LM head\)"):
        passes.FindTargetsPass(Plan(ConvertConfig(lm_head="int8")))(model)
