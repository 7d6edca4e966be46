"""The conversion pipeline as data: pass lists per method, preconditions, and equality with the
hand-sequenced pipeline it replaced."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from serq_onnx import pipeline
from serq_onnx.plan import ConvertConfig, Plan

ALWAYS = ["fold_flattening", "salient", "replace_matmul", "fuse_siblings", "cleanup"]


def _names(options=pipeline.Options(), **cfg) -> list[str]:
    return [s.name for s in pipeline.steps_for(ConvertConfig(**cfg), options)]


def test_pass_lists_per_method():
    head = ["fuse_attention", "untie_lm_head", "find_targets"]
    flat = ["calibrate", "fold_flattening", "permute_weights", "verify_fold", "salient"]
    tail = ["replace_matmul", "fuse_siblings", "cleanup"]
    assert _names(method="serq") == head + flat + ["gptq"] + tail
    assert _names(method="flatten") == head + flat + ["gptq"] + tail
    assert _names(method="smoothquant") == head + flat + ["quantize"] + tail
    assert _names(method="rtn") == head + ["fold_flattening", "salient", "quantize"] + tail
    assert _names(method="rtn", weight_quant="gptq") == head + [
        "calibrate", "fold_flattening", "salient", "gptq"] + tail
    assert _names(method="l2qer") == head + [
        "calibrate", "fold_flattening", "salient", "quantize", "lowrank_factors",
        "replace_matmul", "lowrank_branch", "fuse_siblings", "cleanup"]
    assert _names(method="serq", weight_quant="rtn") == head + flat + ["quantize"] + tail
    # settings outside ConvertConfig
    assert "fuse_siblings" not in _names(pipeline.Options(fuse=False))
    assert "fuse_attention" not in _names(pipeline.Options(fuse_attention=False))
    assert "untie_lm_head" not in _names(lm_head="float")
    assert [s.name for s in pipeline.steps_for(ConvertConfig(), phase="structure")] == head


def test_describe_lists_purpose_and_preconditions():
    steps = pipeline.describe(ConvertConfig(method="l2qer"))
    assert all(d["purpose"] and d["when"] and d["requires"] for d in steps)
    by_name = {d["name"]: d for d in steps}
    assert "CalibratePass" in by_name["lowrank_factors"]["requires"]
    assert "SerqMatMul" in by_name["fuse_siblings"]["requires"]
    assert "does not flatten" in by_name["fold_flattening"]["purpose"]
    assert by_name["cleanup"]["requires"] == "nothing"


def _found(tiny_llama, **cfg):
    from serq_onnx import passes
    from serq_onnx.modelio import load_model

    model = load_model(tiny_llama.onnx_path)
    plan = Plan(ConvertConfig(lm_head="float", **cfg))
    passes.FindTargetsPass(plan)(model)
    return model, plan


def test_unmet_preconditions_name_the_pass_and_what_to_run(tiny_llama):
    from serq_onnx import passes

    model, plan = _found(tiny_llama)
    cases = [
        (passes.FoldFlatteningPass(plan), "FoldFlatteningPass", "CalibratePass"),
        (passes.PermuteWeightsPass(plan), "PermuteWeightsPass", "FoldFlatteningPass"),
        (passes.SalientReconstructionPass(plan), "SalientReconstructionPass",
         "FoldFlatteningPass"),
        (passes.QuantizeWeightsPass(plan), "QuantizeWeightsPass", "SalientReconstructionPass"),
        (passes.GPTQPass(plan), "GPTQPass", "SalientReconstructionPass"),
        (passes.ReplaceMatMulPass(plan), "ReplaceMatMulPass", "QuantizeWeightsPass or GPTQPass"),
        (passes.LowRankFactorsPass(plan), "LowRankFactorsPass", "CalibratePass"),
        (passes.FuseSiblingsPass(plan), "FuseSiblingsPass", "ReplaceMatMulPass"),
        (passes.CalibratePass(Plan(plan.config), [np.arange(4)]), "CalibratePass",
         "FindTargetsPass"),
    ]
    before = ir.to_proto(model).SerializeToString()
    for p, name, run_first in cases:
        with pytest.raises(ir.passes.PreconditionError) as err:
            p(model)
        assert name in str(err.value) and run_first in str(err.value), err.value
    assert ir.to_proto(model).SerializeToString() == before  # nothing ran


def test_gptq_needs_gram_matrices_even_after_the_other_passes(tiny_llama):
    """Calibrated for round to nearest (no Gram matrices), then GPTQ: refused by name."""
    from serq_onnx import passes

    model, plan = _found(tiny_llama, weight_quant="rtn")
    passes.CalibratePass(plan, [np.arange(16) % 300], progress=False)(model)
    for p in (passes.FoldFlatteningPass, passes.PermuteWeightsPass,
              passes.SalientReconstructionPass):
        p(plan)(model)
    plan.config = replace(plan.config, weight_quant="gptq")
    with pytest.raises(ir.passes.PreconditionError, match="GPTQPass: no calibration Gram"):
        passes.GPTQPass(plan, progress=False)(model)


def _hand_sequenced(model: ir.Model, plan: Plan, seqs, fuse: bool) -> None:
    """The pass order ``convert()`` wrote out by hand before the pipeline was data."""
    from serq_onnx import passes

    cfg = plan.config
    if cfg.needs_calibration:
        passes.CalibratePass(plan, seqs, progress=False)(model)
    passes.FoldFlatteningPass(plan)(model)
    passes.PermuteWeightsPass(plan)(model)
    passes.SalientReconstructionPass(plan)(model)
    if cfg.weight_quant == "gptq":
        passes.GPTQPass(plan, progress=False)(model)
    else:
        passes.QuantizeWeightsPass(plan, progress=False)(model)
    if cfg.method == "l2qer":
        passes.LowRankFactorsPass(plan)(model)
    passes.ReplaceMatMulPass(plan)(model)
    if cfg.method == "l2qer":
        passes.LowRankBranchPass(plan)(model)
    if fuse:
        passes.FuseSiblingsPass(plan)(model)
    passes.CleanupPass()(model)


def _graph_data(model: ir.Model) -> tuple[list, dict]:
    nodes = [(n.op_type, n.name, tuple(v.name if v is not None else "" for v in n.inputs))
             for n in model.graph]
    inits = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    return nodes, inits


@pytest.mark.parametrize("method,fuse", [("serq", True), ("l2qer", True), ("rtn", False),
                                         ("smoothquant", True)])
def test_pipeline_equals_the_hand_sequenced_passes(tiny_llama, method, fuse):
    """Same nodes in the same order, bit-identical initializers."""
    from serq_onnx import passes
    from serq_onnx.modelio import load_model

    seqs = [np.random.default_rng(i).integers(0, 320, 24) for i in range(2)]
    cfg = ConvertConfig(method=method, rank=16, group_w=32)
    results = []
    for use_pipeline in (False, True):
        model = load_model(tiny_llama.onnx_path)
        plan = Plan(cfg)
        passes.UntieLMHeadPass()(model)
        passes.FindTargetsPass(plan)(model)
        if use_pipeline:
            ctx = pipeline.Context(plan=plan, model_path=tiny_llama.onnx_path, sequences=seqs,
                                   check_sequences=seqs[:1], progress=False)
            timings: dict[str, float] = {}
            steps = pipeline.steps_for(cfg, pipeline.Options(fuse=fuse), phase="transform")
            assert pipeline.run(steps, model, ctx, timings)
            assert set(timings) <= {"calibration", "folding", "gptq", "quantization"}
        else:
            _hand_sequenced(model, plan, seqs, fuse)
        results.append(_graph_data(model))
    (nodes_a, inits_a), (nodes_b, inits_b) = results
    assert nodes_a == nodes_b
    assert inits_a.keys() == inits_b.keys()
    for k in inits_a:
        np.testing.assert_array_equal(inits_a[k], inits_b[k], err_msg=k)


@pytest.mark.parametrize("export", ["tiny_llama", "tiny_llama_fp16"])
def test_residuals_are_recomputed_bit_identically(export, request):
    """Only R's rows of each residual are kept; reading it gives what ``salient_split``
    returns, each read a fresh array (the quantizers may overwrite it)."""
    from serq_onnx import passes, reference

    model, plan = _found(request.getfixturevalue(export), rank=16, group_w=32)
    passes.CalibratePass(plan, [np.arange(16) % 300], progress=False)(model)
    for p in (passes.FoldFlatteningPass, passes.PermuteWeightsPass,
              passes.SalientReconstructionPass):
        p(plan)(model)
    cfg = plan.config
    for t in plan.targets:
        assert callable(t.residual), t.name
        first, second = t.residual_f32(), t.residual_f32()
        assert first is not second
        _, _, expected = reference.salient_split(t.weight_f32(), t.layer_rank(cfg),
                                                 t.layer_bits(cfg)[0])
        np.testing.assert_array_equal(first, expected, err_msg=t.name)
        np.testing.assert_array_equal(second, expected, err_msg=t.name)
