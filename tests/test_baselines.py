"""The SmoothQuant and L2QER baselines: the converter against the independent torch fake-quant.

Both baselines are built from the same groups, bits and SerqMatMul kernels as SERQ, so their
accuracy can be compared with SERQ's on equal terms; here each must agree with its own PyTorch
implementation as closely as SERQ does in ``test_convert.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import serq_onnx
from serq_onnx import compare
from serq_onnx.converter import convert

torch = pytest.importorskip("torch")
from serq_onnx.fakequant_torch import fakequant_logits

RANK = 16  # below min(K, N) of every tiny layer: a real truncation


def _ids(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(n)]


def _data(model) -> tuple[list[np.ndarray], np.ndarray]:
    vocab = model.config["vocab_size"]
    return _ids(vocab, 3, 64, seed=11), _ids(vocab, 1, 40, seed=12)[0]


# L2QER with absmax weight scales: on these random 2-layer models the rank-16 truncation falls
# between nearly equal singular values, so the factors follow 1e-16 differences between numpy's
# and torch's SVD; with searched scales that moved the logits by 1e-3 (w4a8) to 1e-2 (w4a4,
# where any change propagates through 4-bit activations), measured, with identical main codes.
ABSMAX = {"weight_scale": "absmax"}
CASES = [
    ("tiny_llama", "smoothquant", "w4a8", {"group_w": 32, "group_a": 32}),
    ("tiny_llama", "smoothquant", "w4a4", {"group_w": 32, "group_a": 32}),
    ("tiny_llama_odd", "smoothquant", "w4a8", {"group_w": 64, "group_a": 64}),
    ("tiny_llama", "l2qer", "w4a8", {"group_w": 32, "group_a": 32, **ABSMAX}),
    ("tiny_llama", "l2qer", "w4a4", {"group_w": 32, "group_a": 32, **ABSMAX}),
    ("tiny_llama_odd", "l2qer", "w4a8", {"group_w": 64, "group_a": 64, **ABSMAX}),
]


@pytest.mark.parametrize("fixture,method,scheme,groups", CASES)
def test_baseline_matches_torch_fakequant(request, fixture, method, scheme, groups, tmp_path):
    model = request.getfixturevalue(fixture)
    calib_ids, eval_ids = _data(model)
    settings = dict(rank=RANK, **groups)
    # Attention as exported: the fake-quant runs the model's own attention, and L2QER's 8-bit
    # factors turn the fused kernel's float rounding (1e-6 relative) into a few flipped codes.
    # Fused attention is compared with the fake-quant in test_convert.py (SERQ's defaults).
    convert(model.onnx_path, tmp_path / "out", scheme=scheme, method=method,
            calib_ids=calib_ids, smooth_alpha=0.5, verify=False, progress=False,
            fuse_attention=False, **settings)
    out = tmp_path / "out" / "model.onnx"
    got = compare.logits(serq_onnx.session(out), eval_ids)
    flt = compare.logits(compare.cpu_session(model.onnx_path), eval_ids)
    ref = fakequant_logits(model.hf_dir, [torch.as_tensor(s) for s in calib_ids],
                           torch.as_tensor(eval_ids)[None], bits_a=8 if scheme == "w4a8" else 4,
                           bits_w=4, method=method, smooth_alpha=0.5, lm_head="int8", **settings)
    ref = np.asarray(ref, np.float64).reshape(got.shape)
    to_ref, to_float = compare.diff(got, ref), compare.diff(got, flt)
    # Tolerance as in test_convert.py: float32 rounding may flip an odd code by one step.
    assert to_ref.rel_rms < 2e-3 and to_ref.rel_rms < to_float.rel_rms / 50, (to_ref, to_float)
    assert to_ref.top1_agree >= 0.95

    graph = onnx.load(str(out)).graph
    serq = [n for n in graph.node if n.op_type == "SerqMatMul"]
    # The int8 LM head (the default) is one node with no R, no low-rank branch; the rest follow.
    head = [n for n in serq if n.name == "/lm_head/SerqMatMul"]
    assert len(head) == 1
    head_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head[0].attribute}
    assert (head_attrs["bits_w"], head_attrs["bits_a"], head_attrs["rank"]) == (8, 8, 0)
    serq = [n for n in serq if n is not head[0]]
    n_linears = 7 * model.config["num_hidden_layers"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in serq]
    main = [a for a in attrs if a["bits_w"] == 4]
    # One main node per linear, or per input group where siblings are fused into one node.
    assert len(main) in (n_linears, 4 * model.config["num_hidden_layers"])
    if method == "l2qer":
        # Per linear: the main 4-bit node (rank 0) and the two 8-bit factors, summed by one Add.
        assert len(serq) == len(main) + 2 * n_linears
        assert all(a["rank"] == 0 for a in attrs)
        eight = [a for a in attrs if a["bits_w"] == 8]
        assert len(eight) == 2 * n_linears
        # The factor reading X quantizes it like the main node; the intermediate X A at 8 bits.
        bits_a = 8 if scheme == "w4a8" else 4
        assert sum(a["bits_a"] == bits_a and a["N"] == RANK for a in eight) == n_linears
        assert sum(a["bits_a"] == 8 and a["K"] == RANK for a in eight) == n_linears
        adds = [n for n in graph.node if n.op_type == "Add" and "lowrank" in n.name]
        assert len(adds) == n_linears
        assert all(len(n.input) <= 4 for n in serq)  # no flattening, no permutation
    else:
        assert all(len(n.input) < 6 or not n.input[5] for n in serq)  # no act_perm anywhere


def test_smoothquant_fold_only_graph_equals_float(tiny_llama_odd, tmp_path):
    """SmoothQuant's folds (scales into gamma / up, identity order) keep the float function."""
    from serq_onnx import passes
    from serq_onnx.modelio import load_model, save_model
    from serq_onnx.plan import ConvertConfig, Plan

    vocab = tiny_llama_odd.config["vocab_size"]
    model = load_model(tiny_llama_odd.onnx_path)
    plan = Plan(ConvertConfig(method="smoothquant", smooth_alpha=0.5))
    passes.FindTargetsPass(plan)(model)
    passes.CalibratePass(plan, _ids(vocab, 2, 32, 3), progress=False)(model)
    passes.FoldFlatteningPass(plan)(model)
    passes.PermuteWeightsPass(plan)(model)
    assert any(np.abs(np.log(g.s)).max() > 0.5 for g in plan.groups)
    assert all(np.array_equal(g.perm, np.arange(g.K)) for g in plan.groups)
    assert not any(n.op_type == "Gather" and n.name.startswith("serq/") for n in model.graph)
    save_model(model, tmp_path / "folded.onnx")
    eval_ids = _ids(vocab, 1, 40, 4)[0]
    d = compare.diff(compare.logits(compare.cpu_session(tmp_path / "folded.onnx"), eval_ids),
                     compare.logits(compare.cpu_session(tiny_llama_odd.onnx_path), eval_ids))
    assert d.rel_rms < 1e-5 and d.top1_agree == 1.0, d


def test_smoothquant_scales_formula(tiny_llama, tmp_path):
    """``s_j = max|X_j|^alpha / max_n |W_jn|^(1-alpha)`` over all the group's weights."""
    from serq_onnx import passes
    from serq_onnx.modelio import load_model
    from serq_onnx.plan import ConvertConfig, Plan, initializer_array

    model = load_model(tiny_llama.onnx_path)
    plan = Plan(ConvertConfig(method="smoothquant", smooth_alpha=0.3))
    passes.FindTargetsPass(plan)(model)
    passes.CalibratePass(plan, _data(tiny_llama)[0], progress=False)(model)
    group = next(g for g in plan.groups if len(g.targets) == 3)  # q, k, v
    wmax = np.max([np.abs(initializer_array(t.weight)).max(axis=1) for t in group.targets], 0)
    passes.FoldFlatteningPass(plan)(model)
    want = group.absmax.astype(np.float64) ** 0.3 / wmax.astype(np.float64) ** 0.7
    np.testing.assert_allclose(group.s, want, rtol=1e-6)


def test_baseline_config_errors():
    from serq_onnx.errors import SerqError
    from serq_onnx.plan import ConvertConfig

    with pytest.raises(SerqError, match="alpha"):
        ConvertConfig(method="smoothquant", smooth_alpha=1.5)
    with pytest.raises(SerqError, match="method"):
        ConvertConfig(method="lqer")
    assert ConvertConfig(method="l2qer").needs_calibration
    assert ConvertConfig(method="l2qer").effective_rank == 0
    assert ConvertConfig(method="smoothquant").flattens
