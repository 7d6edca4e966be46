"""The Triton kernels under ``TRITON_INTERPRET=1`` (CPU) against ``serq_onnx/reference.py``.

Activation codes, scales and zero points must be bit-identical to
``reference.quantize_activations``; GEMM outputs must lie within a float32 rounding bound of the
float64 reference (``kernel_tolerance``). Run by ``test_kernels_interp.py`` in a child process
with ``TRITON_INTERPRET=1`` set before Triton is imported: Triton decorates its own standard
library (``tl.max``, ...) and the kernels for the interpreter only if the variable is set when
they are defined, and an interpreted Triton cannot also compile, so the two never share a
process.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
    pytest.skip("needs a process that sets TRITON_INTERPRET=1 before importing triton "
                "(test_kernels_interp.py runs this file so)", allow_module_level=True)
torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
    # e.g. 3.6's interpreter keeps program ids as 1-element arrays, which range() rejects
    pytest.skip(f"the kernels' interpreter tests need triton >= 3.9 (found {triton.__version__})",
                allow_module_level=True)

from kernel_tolerance import INTERPRETER_HALF_ULP, MAX_SPLIT, check  # noqa: E402
from op_models import random_case  # noqa: E402

from serq_onnx import reference as ref  # noqa: E402
from serq_onnx.kernels import configs, launch  # noqa: E402
from serq_onnx.kernels.layout import KernelLayout, param_stride  # noqa: E402

# NaN rows are part of the cases: numpy's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _activations(M, K, seed, nonfinite=True):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K)).astype(np.float32)
    a[:, rng.integers(0, K, 3)] *= 20.0  # outlier channels
    if nonfinite and M >= 3:
        a[1, K // 3] = np.nan
        a[2, K - 1] = -np.inf
    return a


def _tie_rows(rows, K, group, bits_a, seed):
    """Rows whose groups have scale exactly 1 and many x / scale on .5 ties."""
    rng = np.random.default_rng(seed)
    qmax = 2**bits_a - 1
    g = group or K
    A = np.empty((rows, K), np.float32)
    for m in range(rows):
        z = int(rng.integers(1, qmax))
        A[m] = np.clip(rng.integers(-z, qmax - z, K) + rng.choice([0.0, 0.5], K), -z, qmax - z)
        for g0 in range(0, K, g):
            A[m, g0], A[m, min(g0 + 1, K - 1)] = -z, qmax - z
    return A


def _t(x):
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- quantization


QUANT_CASES = {  # K, rank, group_w, group_a, bits_a, block (fast path unit or generic)
    "a8_ga0_odd_k": (201, 40, 64, 0, 8),
    "a4_ga32_partial": (200, 36, 64, 32, 4),
    "a8_ga128_gw32": (300, 64, 32, 128, 8),
    "a8_ga256_gw128_r0": (300, 0, 128, 256, 8),
    "a4_ga64_rank_k": (128, 128, 64, 64, 4),
    "generic_ga8_gw16": (100, 10, 16, 8, 8),
    "a8_ga32_k_lt_gw": (40, 8, 128, 32, 8),
    "a4_ga0_k1100_chunk1024": (1100, 40, 128, 0, 4),
}


@pytest.mark.parametrize("name", list(QUANT_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_quant_codes_bit_identical(name, dtype):
    K, rank, gw, ga, ba = QUANT_CASES[name]
    L = ref.Layout(K=K, N=8, rank=rank, group_w=gw, group_a=ga, bits_a=ba)
    kl = KernelLayout(L)
    rng = np.random.default_rng(3)
    A = np.concatenate([_activations(4, K, 1), _tie_rows(3, K, ga, ba, 2)])
    tdt = getattr(torch, dtype)
    At = torch.from_numpy(A).to(tdt)
    A_seen = At.float().numpy()  # the values the kernel reads (A's own dtype, as the op)
    perm = rng.permutation(K).astype(np.int32)
    scl = rng.uniform(0.5, 2.0, K).astype(np.float32)
    for act_scale, act_perm in ((None, None), (scl, perm), (None, perm.astype(np.int64))):
        q, sa, za, ldp = launch.quantize(At, kl, _t(act_scale), _t(act_perm))
        q, sa, za = q.numpy(), sa.numpy(), za.numpy()
        x = ref.prepare_activations(A_seen, act_scale, act_perm)
        rq, rs, rz = ref.quantize_activations(x, ba, ga)
        M, off = A.shape[0], kl.code_offset
        bad = ~np.isfinite(x).all(axis=1)
        assert bad.sum() == 2
        good = ~bad
        np.testing.assert_array_equal(q[good, :K], rq[good].astype(np.int32) - off)
        np.testing.assert_array_equal(q[good, L.K_pad:L.K_pad + rank],
                                      rq[good, :rank].astype(np.int32) - off)
        # per-unit parameters: the group of the unit's first real channel
        g = kl.group_a_eff
        G = rs.shape[1]
        fin = np.isfinite(np.pad(x, ((0, 0), (0, G * g - K)))).reshape(M, G, g)
        group_bad = ~fin.all(axis=2)  # a NaN scale exactly where the group is non-finite
        assert np.isnan(sa[:, :M][:, bad]).any(axis=0).all()
        for u in range(kl.n_units):
            k = u * kl.unit
            if k >= L.K_ext:
                assert (sa[u, :M][good] == 0).all() and (za[u, :M] == 0).all()
                continue
            c = k if k < L.K_pad else k - L.K_pad
            grp = min(c // g, rs.shape[1] - 1)
            np.testing.assert_array_equal(sa[u, :M][good], rs[good, grp])
            np.testing.assert_array_equal(za[u, :M][good], rz[good, grp] - off)
            np.testing.assert_array_equal(np.isnan(sa[u, :M][bad]), group_bad[bad, grp])
            # padding columns of the unit hold its zero point: they contribute exactly 0
            cols = np.arange(k, k + kl.unit)
            pad = (cols >= L.K) & (cols < L.K_pad) | (cols >= L.K_pad + rank)
            np.testing.assert_array_equal(q[good][:, cols[pad]],
                                          np.repeat(za[u, :M][good][:, None], pad.sum(), 1))
        np.testing.assert_array_equal(q[:, L.K_ext:], 0)
        assert ldp == param_stride(M) and ldp >= M


def test_whole_row_groups_use_the_large_chunk():
    assert configs.quant_chunk(1100) == configs.QUANT_CHUNKS[1] > 1100 // 2
    assert configs.quant_chunk(128) == configs.QUANT_CHUNKS[0]


def test_quant_ties_really_exercised():
    """The tie rows above do land on .5: the round-half-even path is actually tested."""
    A = _tie_rows(3, 200, 32, 8, 2)
    assert (np.abs(A - np.rint(A)) == 0.5).sum() > 100


# ----------------------------------------------------------------------------- GEMM


def _check(case, A, y, y_dtype, n_split=MAX_SPLIT):
    assert y.dtype == y_dtype
    check(case, A, y.float().numpy(), str(y_dtype).removeprefix("torch."), n_split,
          INTERPRETER_HALF_ULP)


# K, N, rank, group_w, group_a, bits_w, bits_a, M
GEMM_CASES = {
    "w4a8_ga128_m7": (200, 41, 36, 64, 128, 4, 8, 7),
    "w4a8_ga0_m1_oddk": (201, 72, 32, 128, 0, 4, 8, 1),
    "w4a4_ga32_m64": (200, 40, 36, 64, 32, 4, 4, 64),
    "w4a8_ga128_r0_m300": (256, 33, 0, 128, 128, 4, 8, 300),
    "w4a4_ga32_gw32_m300": (96, 24, 20, 32, 32, 4, 4, 300),
    "w4a8_u64_m7": (130, 20, 64, 64, 0, 4, 8, 7),
    "w4a8_gw256_m1": (300, 17, 100, 256, 0, 4, 8, 1),
    "w4a4_ga128_gw32_m7": (160, 24, 33, 32, 128, 4, 4, 7),
    "generic_gw16_ga8": (100, 20, 10, 16, 8, 4, 8, 7),
    "generic_w8": (200, 40, 200, 64, 128, 8, 8, 7),
    "generic_w8_gw4_a4": (30, 12, 5, 4, 2, 8, 4, 3),
    "generic_ga48": (96, 20, 8, 96, 48, 4, 8, 3),
}


@pytest.mark.parametrize("name", list(GEMM_CASES))
def test_gemm_matches_reference(name):
    K, N, r, gw, ga, bw, ba, M = GEMM_CASES[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=len(name), act_scale=True,
                       act_perm=np.int32, bias=True)
    A = _activations(M, K, seed=M)
    dw = launch.prepare_weights(case.B, case.scales, case.layout, case.bias)
    y = launch.serq_matmul(_t(A), dw, _t(case.act_scale), _t(case.act_perm))
    _check(case, A, y, torch.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("M", [1, 64])
def test_gemm_half_precision_io(dtype, M):
    """A and Y in float16 / bfloat16: codes from A's own values, Y rounded once at the end."""
    case = random_case(200, 40, 40, 64, 0, seed=5, bias=True)
    tdt = getattr(torch, dtype)
    At = _t(_activations(M, 200, seed=2)).to(tdt)
    A = At.float().numpy()
    dw = launch.prepare_weights(case.B, case.scales, case.layout, case.bias)
    _check(case, A, launch.serq_matmul(At, dw), tdt)


@pytest.mark.parametrize("n_split", [1, 3, 5])
def test_split_k_agrees(n_split):
    """Split-K partials and their reduction give the reference result at any split."""
    case = random_case(576, 40, 64, 64, 64, seed=9, bias=True)
    A = _activations(5, 576, seed=4)
    dw = launch.prepare_weights(case.B, case.scales, case.layout, case.bias)
    y = launch.serq_matmul(_t(A), dw, config=configs.GEMM_CONFIGS[0], n_split=n_split)
    _check(case, A, y, torch.float32, n_split)


@pytest.mark.parametrize("M", [1, 7])
def test_fused_siblings(M):
    """q/k/v fused into one node is just a larger N: each slice equals its own op."""
    K, r, gw, ga = 200, 40, 64, 128
    parts = [random_case(K, n, r, gw, ga, seed=s, bias=True) for s, n in ((1, 32), (2, 16), (3, 17))]
    N = sum(p.layout.N for p in parts)
    L = ref.Layout(K=K, N=N, rank=r, group_w=gw, group_a=ga)
    B = np.concatenate([p.B for p in parts])
    sc = np.concatenate([p.scales for p in parts])
    bias = np.concatenate([p.bias for p in parts])
    A = _activations(M, K, seed=3)
    dw = launch.prepare_weights(B, sc, L, bias)
    y = launch.serq_matmul(_t(A), dw).numpy()
    col = 0
    for p in parts:
        dwp = launch.prepare_weights(p.B, p.scales, p.layout, p.bias)
        alone = launch.serq_matmul(_t(A), dwp).numpy()
        np.testing.assert_array_equal(y[:, col:col + p.layout.N], alone)
        _check(p, A, torch.from_numpy(y[:, col:col + p.layout.N]), torch.float32)
        col += p.layout.N


def test_leading_dims_and_empty_batch():
    case = random_case(128, 24, 16, 64, 0, seed=2)
    dw = launch.prepare_weights(case.B, case.scales, case.layout)
    A = _activations(6, 128, seed=1, nonfinite=False).reshape(2, 3, 128)
    y = launch.serq_matmul(_t(A), dw)
    assert tuple(y.shape) == (2, 3, 24)
    _check(case, A, y, torch.float32)
    assert tuple(launch.serq_matmul(torch.zeros((0, 128)), dw).shape) == (0, 24)


def test_config_classes_cover_m():
    """Every M maps to one class; decode is M <= 16 with split-K allowed, never above."""
    assert configs.gemm_config(1).name == "decode" and configs.gemm_config(16).name == "decode"
    assert configs.gemm_config(17).name != "decode"
    # decode: one row tile holds every M <= 16, so each weight byte is read once per launch
    assert configs.gemm_config(16).BM >= 16
    assert configs.gemm_config(10**6) is configs.GEMM_CONFIGS[-1]
    n, per = configs.split_k(configs.gemm_config(1), 1, 1024, 64)
    assert n > 1 and n * per >= 64 and (n - 1) * per < 64
    assert configs.split_k(configs.gemm_config(4096), 4096, 4096, 64) == (1, 64)
