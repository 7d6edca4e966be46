"""The graph passes on small graphs written with ``onnx.parser``: what they match, what they
fold (checked numerically in onnxruntime), and what they refuse, with the reason recorded."""

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

K, N, F = 8, 6, 10  # hidden, projection, MLP width


def _model(text: str, **weights: np.ndarray) -> ir.Model:
    """Parse ``text`` and attach ``weights`` as initializers (seeded random values)."""
    proto = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
    return ir.serde.deserialize_model(proto)


def _rng_weights(seed: int = 0, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model).SerializeToString()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _find(model: ir.Model, config: ConvertConfig | None = None) -> Plan:
    plan = Plan(config or ConvertConfig())
    result = passes.FindTargetsPass(plan)(model)
    assert result.modified is False  # finding annotates the plan, never the graph
    return plan


def _calibrate(plan: Plan, seed: int = 1) -> None:
    """Statistics as CalibratePass would leave them: an absmax with a few outlier channels."""
    rng = np.random.default_rng(seed)
    for g in plan.groups:
        g.absmax = rng.uniform(0.1, 2.0, g.K).astype(np.float32)
        g.absmax[rng.integers(0, g.K, 2)] *= 30


HEADER = '<ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1]>'

DECOMPOSED_NORM = HEADER + f"""
g (float[2, 3, {K}] x) => (float[2, 3, {N}] qo, float[2, 3, {N}] ko, float[2, 3, {N}] vo,
                          float[2, 3, {K}] r) {{
  sq = Mul(x, x)
  ms = ReduceMean <keepdims = 1> (sq, axes)
  den = Add(ms, eps)
  rs = Sqrt(den)
  inv = Reciprocal(rs)
  h = Mul(x, inv)
  n = Mul(h, gamma)
  q = MatMul(n, Wq)
  k = MatMul(n, Wk)
  v = MatMul(n, Wv)
  qo = Identity(q)
  ko = Identity(k)
  vo = Identity(v)
  r = Identity(x)
}}
"""


def _decomposed(seed=0):
    w = _rng_weights(seed, Wq=(K, N), Wk=(K, N), Wv=(K, N))
    return _model(DECOMPOSED_NORM, gamma=np.linspace(0.5, 1.5, K, dtype=np.float32),
                  axes=np.array([-1], np.int64), eps=np.array(1e-6, np.float32), **w)


def _x(seed=2, shape=(2, 3, K)):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[..., 3] *= 25  # an outlier channel
    return x


def _fold_and_permute(model: ir.Model, plan: Plan) -> None:
    assert passes.FoldFlatteningPass(plan)(model).modified
    assert passes.PermuteWeightsPass(plan)(model).modified


def test_decomposed_rmsnorm_is_one_group_with_gamma():
    model = _decomposed()
    plan = _find(model)
    assert len(plan.groups) == 1
    g = plan.groups[0]
    assert g.kind == "norm" and [t.role for t in g.targets] == ["linear7", "linear8", "linear9"]
    assert g.value.producer().inputs[g.gamma_index].name == "gamma"


def test_fold_into_gamma_keeps_the_function():
    model = _decomposed()
    feeds = {"x": _x()}
    before = _run(model, feeds)
    plan = _find(model)
    _calibrate(plan)
    _fold_and_permute(model, plan)
    g = plan.groups[0]
    assert g.folded == ["scale->gamma"]
    assert "residual stream" in g.runtime_reason  # the permutation is applied at run time
    assert [n.op_type for n in model.graph].count("Gather") == 1
    after = _run(model, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


SKIP_NORM = HEADER + f"""
g (float[2, 3, {K}] x, float[2, 3, {K}] skip) => (float[2, 3, {N}] y, float[2, 3, {K}] s) {{
  n, m, iv, s = com.microsoft.SkipSimplifiedLayerNormalization <epsilon = 0.000001> (x, skip, gamma)
  h = MatMul(n, W)
  y = Identity(h)
}}
"""

SKIP_NORM_SUM_READER = HEADER + f"""
g (float[2, 3, {K}] x, float[2, 3, {K}] skip) => (float[2, 3, {N}] y, float[2, 3, {K}] n) {{
  n, m, iv, s = com.microsoft.SkipSimplifiedLayerNormalization <epsilon = 0.000001> (x, skip, gamma)
  h = MatMul(s, W)
  y = Identity(h)
}}
"""


def _skip_model(text):
    return _model(text, gamma=np.linspace(0.5, 1.5, K, dtype=np.float32),
                  **_rng_weights(0, W=(K, N)))


def test_skip_simplified_layernorm_gamma_is_input_2():
    model = _skip_model(SKIP_NORM)
    plan = _find(model)
    g = plan.groups[0]
    assert g.kind == "norm" and g.gamma_index == 2  # inputs: (input, skip, gamma)


def test_skip_simplified_layernorm_fold_keeps_the_function_and_the_residual():
    model = _skip_model(SKIP_NORM)
    feeds = {"x": _x(), "skip": _x(seed=5)}
    y0, s0 = _run(model, feeds)
    plan = _find(model)
    _calibrate(plan)
    norm = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    skip_before = norm.inputs[1]
    _fold_and_permute(model, plan)
    assert plan.groups[0].folded == ["scale->gamma"]
    assert norm.inputs[1] is skip_before  # the skip input is not touched
    assert norm.inputs[2].name != "gamma"  # a fresh, scaled gamma
    y1, s1 = _run(model, feeds)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s1, s0)  # the residual sum is unchanged bit for bit


def test_skip_norm_sum_output_is_not_folded_into_gamma():
    """A layer reading output 3 (input + skip) must not get the fold: gamma does not scale it."""
    model = _skip_model(SKIP_NORM_SUM_READER)
    feeds = {"x": _x(), "skip": _x(seed=5)}
    before = _run(model, feeds)
    plan = _find(model)
    g = plan.groups[0]
    assert g.kind == "runtime" and "SkipSimplifiedLayerNormalization" in g.runtime_reason
    _calibrate(plan)
    _fold_and_permute(model, plan)
    assert g.folded == []
    for a, b in zip(_run(model, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


MLP = HEADER + f"""
g (float[2, 3, {K}] x) => (float[2, 3, {K}] y{{extra_out}}) {{
  gt = MatMul(x, Wg)
  up = MatMul(x, Wu)
  sg = Sigmoid(gt)
  si = Mul(gt, sg)
  a = Mul(si, up)
  d = MatMul(a, Wd)
  y = Identity(d)
  {{extra}}
}}
"""


def _mlp(shared_up: bool):
    text = MLP.replace("{extra_out}", f", float[2, 3, {F}] u2" if shared_up else "")
    text = text.replace("{extra}", "u2 = Identity(up)" if shared_up else "")
    return _model(text, **_rng_weights(3, Wg=(K, F), Wu=(K, F), Wd=(F, K)))


def test_mlp_down_proj_folds_scale_and_permutation_into_up_and_gate():
    model = _mlp(shared_up=False)
    feeds = {"x": _x()}
    before = _run(model, feeds)
    plan = _find(model)
    down = next(g for g in plan.groups if g.kind == "mlp_act")
    assert down.up.node.inputs[1].name == "Wu" and down.gate.node.inputs[1].name == "Wg"
    _calibrate(plan)
    _fold_and_permute(model, plan)
    assert down.folded == ["scale->up", "perm->gate,up"] and down.runtime_reason == ""
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gather") == 1  # only the x group (a graph input) permutes at run time
    for a, b in zip(_run(model, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mlp_with_shared_up_output_falls_back_to_run_time_with_a_reason():
    model = _mlp(shared_up=True)
    feeds = {"x": _x()}
    before = _run(model, feeds)
    plan = _find(model)
    down = next(g for g in plan.groups if g.kind == "mlp_act")
    _calibrate(plan)
    _fold_and_permute(model, plan)
    assert down.folded == [] and "used elsewhere" in down.runtime_reason
    for a, b in zip(_run(model, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_graph_input_group_records_why_it_runs_at_run_time():
    plan = _find(_mlp(shared_up=False))
    g = next(g for g in plan.groups if g.kind == "runtime")
    assert g.runtime_reason == "the input is a graph input"


LM_HEAD = HEADER + f"""
g (float[2, {K}] x) => (float[2, {N}] logits, float[2, {N}] h2) {{
  h = MatMul(x, W1)
  h2 = Relu(h)
  logits = MatMul(x, W2)
}}
"""


def test_matmul_producing_a_graph_output_is_not_a_target():
    """Only the MatMul producing ``logits`` is taken as the LM head (by default, as int8)."""
    model = _model(LM_HEAD, **_rng_weights(0, W1=(K, N), W2=(K, N)))
    plan = _find(model, ConvertConfig(lm_head="float"))
    assert [t.node.inputs[1].name for t in plan.targets] == ["W1"]
    plan = _find(_model(LM_HEAD, **_rng_weights(0, W1=(K, N), W2=(K, N))))
    assert [(t.node.inputs[1].name, t.role, t.bits, t.rank_cap) for t in plan.targets] == [
        ("W1", plan.targets[0].role, None, None), ("W2", "lm_head", (8, 8), 0)]


def test_output_other_than_logits_is_never_a_target():
    graph = LM_HEAD.replace("logits", "out")
    plan = _find(_model(graph, **_rng_weights(0, W1=(K, N), W2=(K, N))))
    assert [t.node.inputs[1].name for t in plan.targets] == ["W1"]


SHARED_INPUT = HEADER + f"""
g (float[2, {K}] x) => (float[2, {N}] y, float[2, {K}] z) {{
  n = Mul(x, gamma)
  h = MatMul(n, W)
  y = Identity(h)
  z = Relu(n)
}}
"""


def test_norm_output_read_by_another_op_is_not_folded():
    model = _model(SHARED_INPUT, gamma=np.ones(K, np.float32), **_rng_weights(0, W=(K, N)))
    feeds = {"x": _x(shape=(2, K))}
    before = _run(model, feeds)
    plan = _find(model)
    g = plan.groups[0]
    assert g.kind == "runtime" and "Relu" in g.runtime_reason
    _calibrate(plan)
    _fold_and_permute(model, plan)
    for a, b in zip(_run(model, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_linear_layer_is_a_clear_error():
    model = _model(HEADER + "g (float[2, 4] x) => (float[2, 4] y) { y = Relu(x) }")
    with pytest.raises(SerqError, match="no linear layers"):
        _find(model)


def test_dynamic_weight_is_not_a_target():
    text = HEADER + f"""
    g (float[2, {K}] x, float[{K}, {N}] w) => (float[2, {N}] y, float[2, {N}] y2) {{
      y = MatMul(x, w)
      h = MatMul(x, W)
      y2 = Relu(h)
    }}"""
    plan = _find(_model(text, **_rng_weights(0, W=(K, N))))
    assert [t.node.inputs[1].name for t in plan.targets] == ["W"]


def test_float16_weights_are_targets_and_bfloat16_is_refused():
    text = HEADER + f"""
    g (float16[2, {K}] x) => (float16[2, {N}] y) {{
      h = MatMul(x, W)
      y = Relu(h)
    }}"""
    plan = _find(_model(text, W=np.ones((K, N), np.float16)))
    assert [t.node.inputs[1].name for t in plan.targets] == ["W"]
    import ml_dtypes

    model = _model(text.replace("float16", "bfloat16"))
    w = ir.Value(name="W", const_value=ir.tensor(np.ones((K, N), ml_dtypes.bfloat16)))
    model.graph.register_initializer(w)
    model.graph[0].replace_input_with(1, w)
    with pytest.raises(SerqError, match="BFLOAT16 weights are not supported"):
        _find(model)


TIED_HEAD = HEADER + f"""
g (int64[2, 3] ids) => (float[2, 3, 40] logits) {{
  e = Gather(embed, ids)
  h = MatMul(e, Wd)
  n = Mul(h, gamma)
  et = Transpose <perm = [1, 0]> (embed)
  logits = MatMul(n, et)
}}
"""


def test_untie_lm_head_gives_the_head_its_own_weight():
    model = _model(TIED_HEAD, embed=_rng_weights(0, E=(40, K))["E"],
                   gamma=np.linspace(0.5, 1.5, K, dtype=np.float32),
                   Wd=_rng_weights(1, Wd=(K, K))["Wd"])
    feeds = {"ids": np.array([[1, 5, 7], [0, 39, 2]], np.int64)}
    before = _run(model, feeds)
    assert passes.UntieLMHeadPass()(model).modified
    head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits")
    np.testing.assert_array_equal(head.inputs[1].const_value.numpy(),
                                  model.graph.initializers["embed"].const_value.numpy().T)
    np.testing.assert_array_equal(_run(model, feeds)[0], before[0])
    plan = _find(model, ConvertConfig(lm_head="int8"))
    decoder, t = plan.targets
    assert decoder.node.inputs[1].name == "Wd" and t.role == "lm_head"
    assert t.layer_bits(plan.config) == (8, 8)
    assert t.layer_rank(plan.config) == 0
    assert not passes.UntieLMHeadPass()(model).modified  # nothing left to untie


def test_untie_lm_head_leaves_other_transposes():
    text = TIED_HEAD.replace("perm = [1, 0]", "perm = [0, 1]")
    model = _model(text, embed=_rng_weights(0, E=(K, 40))["E"].T.copy(),
                   gamma=np.ones(K, np.float32), Wd=np.eye(K, dtype=np.float32))
    assert not passes.UntieLMHeadPass()(model).modified


def _matmul_target(model: ir.Model):
    from serq_onnx.plan import Target

    node = next(iter(model.graph))
    return Target(node=node, name="w", role="q", layer=0, K=K, N=N)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_flattened_weight_is_computed_when_read_in_the_graphs_dtype(dtype):
    """``W^ = (diag(s) W)[pi]``: float32 for the quantizers, the graph's dtype in the graph,
    a fresh array each read (nothing held)."""
    from serq_onnx.passes.permute_weights import set_flattened_lazily

    w = np.random.default_rng(0).standard_normal((K, N)).astype(dtype)
    model = _model(f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({"float" if dtype == np.float32 else "float16"}[2, {K}] x) => (y)
        {{ y = MatMul(x, w) }}""", w=w)
    t = _matmul_target(model)
    s = np.linspace(0.5, 2.0, K).astype(np.float32)
    perm = np.random.default_rng(1).permutation(K)
    set_flattened_lazily(t, s, perm)
    expected = (s[:, None] * w.astype(np.float32))[perm]
    first, second = t.weight_f32(), t.weight_f32()
    assert first is not second and first.dtype == np.float32
    np.testing.assert_array_equal(first, expected)
    stored = t.weight.const_value.numpy()
    assert stored.dtype == dtype and t.weight.dtype == ir.DataType.from_numpy(np.dtype(dtype))
    np.testing.assert_array_equal(stored, expected.astype(dtype))


def test_flattened_fp16_weight_that_overflows_is_refused_by_name():
    w = np.full((K, N), 30000.0, np.float16)
    model = _model(f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float16[2, {K}] x) => (float16[2, {N}] y) {{ y = MatMul(x, w) }}""", w=w)
    t = _matmul_target(model)
    from serq_onnx.passes.permute_weights import set_flattened_lazily

    with pytest.raises(SerqError,
                       match="w: the flattened weight overflows float16.*float32 export"):
        set_flattened_lazily(t, np.full(K, 3.0, np.float32), np.arange(K))


def test_mlp_fold_is_computed_when_read_from_the_original_weights():
    """The folded gate/up weights are not held: each read computes ``(W_up / s)[:, pi]`` and
    ``W_gate[:, pi]`` afresh from the untouched originals."""
    model = _mlp(shared_up=False)
    original = {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("Wu", "Wg")}
    plan = _find(model)
    down = next(g for g in plan.groups if g.kind == "mlp_act")
    _calibrate(plan)
    assert passes.FoldFlatteningPass(plan)(model).modified
    inv = (np.float32(1) / down.s).astype(np.float32)
    want = {"Wu": (original["Wu"] * inv[None, :])[:, down.perm],
            "Wg": original["Wg"][:, down.perm]}
    for name, expected in want.items():
        tensor = model.graph.initializers[name].const_value
        assert isinstance(tensor, ir.LazyTensor), name
        first, second = tensor.numpy(), tensor.numpy()
        assert first is not second
        np.testing.assert_array_equal(first, expected)
        np.testing.assert_array_equal(second, expected)


def test_fp16_mlp_fold_that_overflows_is_refused_by_name():
    """An up weight divided by a small activation scale past FP16's range is an error naming
    the weight, when folding, not an infinity in the model."""
    text = MLP.replace("float[", "float16[").replace("{extra_out}", "").replace("{extra}", "")
    w = {k: (100 * v).astype(np.float16) for k, v in
         _rng_weights(3, Wg=(K, F), Wu=(K, F), Wd=(F, K)).items()}
    model = _model(text, **w)
    plan = _find(model)
    for g in plan.groups:
        g.absmax = np.full(g.K, 1e-3, np.float32)
    with pytest.raises(SerqError, match="Wu: the folded weight overflows float16"):
        passes.FoldFlatteningPass(plan)(model)
