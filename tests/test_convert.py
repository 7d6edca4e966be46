"""The converter end to end on tiny Optimum-exported Llamas.

The converted ONNX model is compared with an independent PyTorch fake-quant of the same algorithm
(``serq_onnx.fakequant_torch``): both quantize the same way, so they must agree far more closely
than either agrees with the float model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import serq_onnx
from serq_onnx import compare
from serq_onnx.converter import convert

torch = pytest.importorskip("torch")
from serq_onnx.fakequant_torch import fakequant_logits  # noqa: E402

SETTINGS = dict(rank=32, group_w=32, group_a=32)


def _ids(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(n)]


@pytest.fixture(scope="module")
def calib(tiny_llama):
    import json

    vocab = json.loads((tiny_llama.hf_dir / "config.json").read_text())["vocab_size"]
    return _ids(vocab, 4, 64, seed=1), _ids(vocab, 1, 48, seed=2)[0]


def _onnx_logits(path, ids):
    return compare.logits(serq_onnx.session(path), ids)


def _float_logits(path, ids):
    return compare.logits(compare.cpu_session(path), ids)


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
def test_converted_model_matches_torch_fakequant(tiny_llama, calib, scheme, tmp_path):
    """Default settings on both sides: GPTQ with searched scales, the scheme's groups, the int8
    LM head."""
    calib_ids, eval_ids = calib
    report = convert(tiny_llama.onnx_path, tmp_path / "out", scheme=scheme, calib_ids=calib_ids,
                     progress=False, **SETTINGS)
    out = tmp_path / "out" / "model.onnx"
    got = _onnx_logits(out, eval_ids)
    flt = _float_logits(tiny_llama.onnx_path, eval_ids)
    bits_a = 8 if scheme == "w4a8" else 4
    ref = fakequant_logits(tiny_llama.hf_dir, [torch.as_tensor(s) for s in calib_ids],
                           torch.as_tensor(eval_ids)[None], bits_a=bits_a, bits_w=4,
                           lm_head="int8", **SETTINGS)
    ref = np.asarray(ref, np.float64).reshape(got.shape)
    to_ref, to_float = compare.diff(got, ref), compare.diff(got, flt)
    # Same algorithm, independent code: they differ only by float32 rounding (1e-7 relative),
    # which now and then moves a value across a rounding boundary and flips one code by one step
    # (seen: 6e-4 relative for a handful of flips); the quantization error itself is ~1e-1.
    assert to_ref.rel_rms < 2e-3 and to_ref.rel_rms < to_float.rel_rms / 50, (to_ref, to_float)
    assert to_ref.top1_agree >= 0.95
    # And quantization is still close to float.
    assert to_float.rel_rms < (0.1 if scheme == "w4a8" else 0.5), to_float
    assert report.layers_converted == 15 and report.config["lm_head"] == "int8"


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
def test_float_lm_head_matches_torch_fakequant(tiny_llama, calib, scheme, tmp_path):
    """``lm_head="float"`` on both sides. (By default the head goes through the same
    calibration, smoothing, permutation and GPTQ as the body, with 8-bit weights and activations
    and no salient rows: the test above.)"""
    calib_ids, eval_ids = calib
    report = convert(tiny_llama.onnx_path, tmp_path / "out", scheme=scheme, calib_ids=calib_ids,
                     lm_head="float", progress=False, **SETTINGS)
    assert report.layers_converted == 14 and report.config["lm_head"] == "float"
    got = _onnx_logits(tmp_path / "out" / "model.onnx", eval_ids)
    flt = _float_logits(tiny_llama.onnx_path, eval_ids)
    kw = dict(bits_a=8 if scheme == "w4a8" else 4, bits_w=4, **SETTINGS)
    calib_t = [torch.as_tensor(s) for s in calib_ids]
    ref = fakequant_logits(tiny_llama.hf_dir, calib_t, torch.as_tensor(eval_ids)[None], **kw)
    ref = np.asarray(ref, np.float64).reshape(got.shape)
    with_head = fakequant_logits(tiny_llama.hf_dir, calib_t, torch.as_tensor(eval_ids)[None],
                                 lm_head="int8", **kw)
    with_head = np.asarray(with_head, np.float64).reshape(got.shape)
    to_ref, to_float = compare.diff(got, ref), compare.diff(got, flt)
    # Tolerances of the default-settings test above.
    assert to_ref.rel_rms < 2e-3 and to_ref.rel_rms < to_float.rel_rms / 50, (to_ref, to_float)
    assert to_ref.top1_agree >= 0.95
    # The fake-quant's int8 head really is quantized: its effect is far above the agreement.
    assert compare.diff(with_head, ref).rel_rms > 5 * to_ref.rel_rms


@pytest.mark.parametrize("scheme,method,weight_quant,weight_scale",
                         [("w4a8", "serq", "rtn", "absmax"), ("w4a8", "serq", "rtn", "mse"),
                          ("w4a4", "rtn", "gptq", "mse"), ("w4a4", "serq", "gptq", "absmax")])
def test_weight_rounding_variants_match_torch_fakequant(tiny_llama, calib, scheme, method,
                                                        weight_quant, weight_scale, tmp_path):
    """Main weights rounded to nearest or by GPTQ, with absmax or searched group scales: the
    ONNX converter and the torch fake-quant, each with its own implementation."""
    calib_ids, eval_ids = calib
    kw = dict(method=method, weight_quant=weight_quant, weight_scale=weight_scale, **SETTINGS)
    report = convert(tiny_llama.onnx_path, tmp_path / "out", scheme=scheme, calib_ids=calib_ids,
                     progress=False, **kw)
    got = _onnx_logits(tmp_path / "out" / "model.onnx", eval_ids)
    flt = _float_logits(tiny_llama.onnx_path, eval_ids)
    ref = fakequant_logits(tiny_llama.hf_dir, [torch.as_tensor(s) for s in calib_ids],
                           torch.as_tensor(eval_ids)[None], bits_a=8 if scheme == "w4a8" else 4,
                           bits_w=4, lm_head="int8", **kw)
    ref = np.asarray(ref, np.float64).reshape(got.shape)
    to_ref, to_float = compare.diff(got, ref), compare.diff(got, flt)
    # Tolerances as in the test above (measured: 2e-7 relative, no code flips).
    assert to_ref.rel_rms < 2e-3 and to_ref.rel_rms < to_float.rel_rms / 50, (to_ref, to_float)
    assert to_ref.top1_agree >= 0.95
    assert to_float.rel_rms < (0.1 if scheme == "w4a8" else 0.5), to_float
    assert report.config["weight_quant"] == weight_quant
    assert report.config["weight_scale"] == weight_scale
    assert (report.timings.get("gptq", 0) > 0) == (weight_quant == "gptq")


@pytest.mark.parametrize("fuse", [False, True])
def test_converted_graph_structure(tiny_llama, calib, tmp_path, fuse):
    calib_ids, eval_ids = calib
    report = convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib_ids,
                     progress=False, fuse=fuse, lm_head="float", **SETTINGS)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    serq = [n for n in model.graph.node if n.op_type == "SerqMatMul"]
    assert all(n.domain == "com.serq" for n in serq)
    # Every decoder linear is in a SerqMatMul: 7 per layer, or 4 nodes per layer when q/k/v and
    # gate/up share one node (then split), with the columns of all 7 layers accounted for.
    assert report.layers_converted == 2 * 7
    assert len(serq) == (2 * 4 if fuse else 2 * 7) == report.serq_nodes
    n_total = sum(next(a.i for a in n.attribute if a.name == "N") for n in serq)
    assert n_total == sum(t for t in _linear_widths(tiny_llama))
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == (2 * 2 if fuse else 0)
    inits = {i.name for i in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weighted) == 1 and "lm_head" in weighted[0].name  # lm_head stays float
    assert any(o.domain == "com.serq" and o.version == 1 for o in model.opset_import)
    # q/k/v and gate/up take their permutation at run time; down's is folded into gate/up.
    down = [n for n in serq if "down_proj" in n.name]
    assert len(down) == 2 and all(len(n.input) <= 4 for n in down)
    qkv = [n for n in serq if "q_proj" in n.name]
    assert len(qkv) == 2
    assert all(len(n.input) == 6 and n.input[4] == "" and n.input[5] for n in qkv)
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file()
    assert (tmp_path / "out" / "serq_config.json").is_file()


def _linear_widths(tiny) -> list[int]:
    c = tiny.config
    head = c["hidden_size"] // c["num_attention_heads"]
    per_layer = [c["hidden_size"], c["num_key_value_heads"] * head, c["num_key_value_heads"] * head,
                 c["hidden_size"], c["intermediate_size"], c["intermediate_size"],
                 c["hidden_size"]]
    return per_layer * c["num_hidden_layers"]


def test_fused_and_separate_nodes_compute_the_same(tiny_llama, calib, tmp_path):
    calib_ids, eval_ids = calib
    out = {}
    for fuse in (False, True):
        convert(tiny_llama.onnx_path, tmp_path / f"out{fuse}", calib_ids=calib_ids,
                progress=False, fuse=fuse, **SETTINGS)
        out[fuse] = _onnx_logits(tmp_path / f"out{fuse}" / "model.onnx", eval_ids)
    # Column blocks of the op are independent: fusing changes no arithmetic at all.
    np.testing.assert_array_equal(out[False], out[True])


def test_odd_hidden_size_converts_exactly(tiny_llama_odd, tmp_path):
    """Hidden size not a multiple of the group size: partial last groups, no refusal."""
    import json

    vocab = json.loads((tiny_llama_odd.hf_dir / "config.json").read_text())["vocab_size"]
    calib_ids, eval_ids = _ids(vocab, 3, 64, 5), _ids(vocab, 1, 40, 6)[0]
    settings = dict(rank=64, group_w=64, group_a=64)
    convert(tiny_llama_odd.onnx_path, tmp_path / "out", calib_ids=calib_ids, progress=False,
            **settings)
    got = _onnx_logits(tmp_path / "out" / "model.onnx", eval_ids)
    ref = fakequant_logits(tiny_llama_odd.hf_dir, [torch.as_tensor(s) for s in calib_ids],
                           torch.as_tensor(eval_ids)[None], bits_a=8, bits_w=4, lm_head="int8",
                           **settings)
    flt = _float_logits(tiny_llama_odd.onnx_path, eval_ids)
    to_ref = compare.diff(got, np.asarray(ref, np.float64).reshape(got.shape))
    assert to_ref.rel_rms < 2e-3, to_ref  # see the tolerance note above
    assert compare.diff(got, flt).rel_rms > 50 * to_ref.rel_rms


def test_fold_only_graph_equals_float(tiny_llama_odd, tmp_path):
    """Flattening and permutation alone (no quantization) must leave the float function intact."""
    import json

    from serq_onnx import passes
    from serq_onnx.modelio import load_model, save_model
    from serq_onnx.plan import ConvertConfig, Plan

    vocab = json.loads((tiny_llama_odd.hf_dir / "config.json").read_text())["vocab_size"]
    model = load_model(tiny_llama_odd.onnx_path)
    plan = Plan(ConvertConfig())
    passes.FindTargetsPass(plan)(model)
    passes.CalibratePass(plan, _ids(vocab, 2, 32, 3), progress=False)(model)
    passes.FoldFlatteningPass(plan)(model)
    passes.PermuteWeightsPass(plan)(model)
    # The folds must really have moved weights: flattening scales are far from 1.
    assert any(np.abs(np.log(g.s)).max() > 0.5 for g in plan.groups)
    assert {g.kind for g in plan.groups} == {"norm", "mlp_act", "runtime"}
    save_model(model, tmp_path / "folded.onnx")
    eval_ids = _ids(vocab, 1, 40, 4)[0]
    d = compare.diff(_float_logits(tmp_path / "folded.onnx", eval_ids),
                     _float_logits(tiny_llama_odd.onnx_path, eval_ids))
    assert d.rel_rms < 1e-5 and d.top1_agree == 1.0, d
