"""GPTQ for the residual main weight: the numpy pass, its Hessian, and its calibration."""

from __future__ import annotations

import numpy as np
import pytest

from serq_onnx import reference
from serq_onnx.errors import SerqError
from serq_onnx.passes.gptq import gptq_quantize, layer_hessian
from serq_onnx.plan import ConvertConfig


def _problem(K=80, N=24, T=512, seed=0):
    """A weight and strongly correlated inputs (a random mixing of iid channels)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
    x = rng.standard_normal((T, K)) @ mix
    w = rng.standard_normal((K, N)).astype(np.float32)
    return w, x


def _out_err(x, w, codes, scales, group):
    return np.linalg.norm(x @ (w - reference.dequantize_weight(codes, scales, group)))


@pytest.mark.parametrize("group", [32, 0])
def test_gptq_beats_rtn_and_meets_contract(group):
    w, x = _problem()  # K = 80: with group 32 the last group is partial
    K, N = w.shape
    codes, scales = gptq_quantize(w, x.T @ x / len(x), 4, group)
    G = -(-K // group) if group else 1
    assert codes.dtype == np.int8 and codes.shape == (K, N)
    assert scales.dtype == np.float32 and scales.shape == (G, N)
    assert codes.min() >= -7 and codes.max() <= 7
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)
    rtn = reference.quantize_weight(w, 4, group)
    # Measured: 0.73x RTN's output error at group 32 and at group 0.
    assert _out_err(x, w, codes, scales, group) < 0.8 * _out_err(x, w, *rtn, group)
    # The codes pack into the op's inputs unchanged and the op applies them.
    L = reference.Layout(K=K, N=N, rank=0, group_w=32, group_a=32)
    if group == 32:
        wts = reference.assemble_weights(L, codes, scales, np.zeros((0, N), np.int8),
                                         np.ones(N, np.float32))
        np.testing.assert_allclose(reference.effective_weight(wts),
                                   reference.dequantize_weight(codes, scales, group), rtol=1e-6)


@pytest.mark.parametrize("group", [32, 16, 0])
def test_gptq_with_identity_hessian_is_rtn(group):
    # Uncorrelated inputs: no error to propagate, so GPTQ is round to nearest, bit for bit.
    w, _ = _problem(K=80)
    codes, scales = gptq_quantize(w, np.eye(80) * 3.0, 4, group)
    want_codes, want_scales = reference.quantize_weight(w, 4, group)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales, want_scales)


def test_gptq_dead_channels_are_rounded_not_zeroed():
    w, x = _problem()
    x[:, [5, 40]] = 0.0  # never seen in calibration
    codes, scales = gptq_quantize(w, x.T @ x, 4, 16)
    deq = reference.dequantize_weight(codes, scales, 16)
    for k in (5, 40):
        # No error reaches a dead row, so its own weight is rounded to nearest.
        assert np.all(np.abs(deq[k] - w[k]) <= scales[k // 16] / 2 * (1 + 1e-6))
        assert np.any(codes[k] != 0)
    # A Hessian that is all zero (nothing seen at all) degenerates to round to nearest.
    codes0, _ = gptq_quantize(w, np.zeros((80, 80)), 4, 16)
    np.testing.assert_array_equal(codes0, reference.quantize_weight(w, 4, 16)[0])


def test_gptq_rejects_bad_hessians():
    w, x = _problem(K=16)
    with pytest.raises(SerqError):
        gptq_quantize(w, np.eye(15), 4, 16)
    h = x.T @ x
    h[0, 0] = np.nan
    with pytest.raises(SerqError):
        gptq_quantize(w, h, 4, 16)


def test_layer_hessian_is_that_of_the_transformed_input():
    _, x = _problem(K=40, T=64, seed=3)
    rng = np.random.default_rng(4)
    s = rng.uniform(0.5, 30.0, size=40).astype(np.float32)
    perm = np.argsort(-s, kind="stable")
    x_hat = (x / s)[:, perm]
    np.testing.assert_allclose(layer_hessian(x.T @ x, 64, s, perm), x_hat.T @ x_hat / 64,
                               rtol=1e-12, atol=1e-12)


def test_config_validates_weight_quant():
    assert ConvertConfig(weight_quant="gptq").needs_calibration
    assert ConvertConfig(method="rtn", weight_quant="gptq").needs_calibration
    assert not ConvertConfig(method="rtn").needs_calibration  # baselines round to nearest
    assert ConvertConfig().weight_quant == "gptq" and ConvertConfig().needs_calibration
    with pytest.raises(SerqError, match="weight quantizer"):
        ConvertConfig(weight_quant="awq")
    for damp in (0, -0.1, 2.0, float("nan"), True):
        with pytest.raises(SerqError, match="gptq_damp"):
            ConvertConfig(weight_quant="gptq", gptq_damp=damp)


def test_torch_gptq_agrees_with_numpy():
    """The torch fake-quant's GPTQ is an independent implementation of the same algorithm."""
    torch = pytest.importorskip("torch")
    from serq_onnx.fakequant_torch import gptq_quantize_weight

    w, x = _problem(K=96, N=20, seed=5)
    h = x.T @ x / len(x)
    for group in (32, 0):
        codes, scales = gptq_quantize(w, h, 4, group, damp=0.05)
        tc, ts = gptq_quantize_weight(torch.tensor(w), torch.tensor(h), 4, group, damp=0.05)
        np.testing.assert_array_equal(codes, tc.numpy().astype(np.int8))
        np.testing.assert_array_equal(scales, ts.numpy())


def test_calibration_gram_matches_torch(tiny_llama):
    """The in-graph Gram matrices equal the torch model's input second moments."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from serq_onnx import passes
    from serq_onnx.fakequant_torch import calibrate_hessians
    from serq_onnx.modelio import load_model
    from serq_onnx.plan import Plan

    vocab = tiny_llama.config["vocab_size"]
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, vocab, size=n, dtype=np.int64) for n in (40, 24)]
    model = load_model(tiny_llama.onnx_path)
    plan = Plan(ConvertConfig(weight_quant="gptq", lm_head="float"))
    passes.FindTargetsPass(plan)(model)
    passes.CalibratePass(plan, seqs, progress=False)(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama.hf_dir)).eval()
    hess = calibrate_hessians(hf, [torch.as_tensor(s) for s in seqs])
    assert len(plan.groups) == 2 * 4
    for group in plan.groups:
        assert group.tokens == 64 and group.gram.dtype == passes.calibrate.GRAM_DTYPE
        assert group.gram.shape == (group.K, group.K)
        # Unchanged absmax, and each channel's RMS is at most its absmax.
        assert np.all(np.sqrt(np.diag(group.gram) / 64) <= group.absmax * (1 + 1e-5))
        for t in group.targets:
            want = hess["model." + t.name].numpy() * 64
            np.testing.assert_allclose(group.gram, want, rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())


def test_a_group_job_holds_few_float64_hessian_copies():
    """GPTQ's float64 ``K x K`` arrays dominate the sweep for wide layers (1.5 GiB each at
    K = 14336): a job builds its Hessian from the float32 Gram sums, gives it up once factored
    and never holds it beside a copy or an identity matrix. numpy arrays only (tracemalloc;
    LAPACK's own buffers are not traced): at most three at once, where copying the Hessian and
    solving against an identity held five."""
    import tracemalloc

    from serq_onnx.passes.gptq import GPTQJob, run_job

    K, N = 768, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, K)).astype(np.float32)
    gram = (x.T @ x).astype(np.float32)
    job = GPTQJob("g", rng.standard_normal((K, N)).astype(np.float32), gram, 1024,
                  np.ones(K, np.float32), np.arange(K), 4, 128, 0.01, False)
    tracemalloc.start()
    try:
        codes, _ = run_job(job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    unit = K * K * 8
    assert peak <= 3.2 * unit, peak / unit
    assert codes.shape == (K, N)
