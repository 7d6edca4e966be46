"""The kernels' buffer geometry and the one-time weight repack (numpy only, no Triton)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from op_models import random_case

from serq_onnx import reference as ref
from serq_onnx.kernels.layout import FAST_UNITS, KernelLayout, param_stride
from serq_onnx.kernels.repack import repack_fast, unpack_fast

LAYOUTS = [  # K, N, rank, group_w, group_a, bits_w
    (200, 41, 36, 64, 128, 4), (201, 72, 32, 128, 0, 4), (200, 40, 36, 64, 32, 4),
    (256, 33, 0, 128, 128, 4), (96, 24, 20, 32, 32, 4), (130, 20, 64, 64, 0, 4),
    (300, 17, 100, 256, 0, 4), (160, 24, 33, 32, 128, 4), (40, 8, 8, 128, 32, 4),
    (100, 20, 10, 16, 8, 4), (200, 40, 200, 64, 128, 8), (96, 20, 8, 96, 48, 4),
]


@pytest.mark.parametrize("K,N,r,gw,ga,bw", LAYOUTS)
def test_kernel_layout_invariants(K, N, r, gw, ga, bw):
    L = ref.Layout(K=K, N=N, rank=r, group_w=gw, group_a=ga, bits_w=bw)
    kl = KernelLayout(L)
    assert kl.path == ("fast" if bw == 4 and L.block % 32 == 0 else "generic")
    assert L.block % kl.unit == 0 and L.group_w % kl.unit == 0
    assert kl.n_units * kl.unit == kl.KX >= L.K_ext
    if kl.path == "fast":
        assert kl.unit in FAST_UNITS and kl.pair == kl.unit * kl.units_per_pair
        assert kl.KX % kl.pair == 0 and kl.KX - L.K_ext < kl.pair
        # the manifest declares ldq = KX and ldw = KX / 2 divisible by 16
        assert kl.KX % 16 == 0 and (kl.KX // 2) % 16 == 0
    else:
        assert kl.KX == L.K_ext and kl.unit == L.block
    # units never straddle two activation groups (or the main / extended boundary)
    g = kl.group_a_eff
    for u in range(L.K_ext // kl.unit):
        k0, k1 = u * kl.unit, (u + 1) * kl.unit - 1
        assert (k0 < L.K_pad) == (k1 < L.K_pad)
        c0, c1 = (k0, k1) if k0 < L.K_pad else (k0 - L.K_pad, k1 - L.K_pad)
        assert min(c0 // g, kl.n_groups - 1) == min(c1 // g, kl.n_groups - 1)


@pytest.mark.parametrize("K,N,r,gw,ga,bw", [x for x in LAYOUTS if x[5] == 4])
def test_repack_round_trip_and_unit_sums(K, N, r, gw, ga, bw):
    case = random_case(K, N, r, gw, ga, bw, seed=K + N)
    kl = KernelLayout(case.layout)
    if kl.path != "fast":
        with pytest.raises(ref.ContractError):
            repack_fast(case.B, case.scales, case.layout)
        return
    L = case.layout
    fw = repack_fast(case.B, case.scales, L)
    assert fw.Bp.dtype == np.int8 and fw.Bp.shape == (N, kl.KX // 2)
    codes = unpack_fast(fw)
    np.testing.assert_array_equal(codes[:, : L.K_ext], ref.unpack_int4(case.B))
    np.testing.assert_array_equal(codes[:, L.K_ext:], 0)
    # byte i of pair p: low nibble row p*2h + i, high nibble row p*2h + h + i
    h = kl.half
    rng = np.random.default_rng(0)
    for n, p, i in zip(rng.integers(0, N, 20), rng.integers(0, kl.n_pairs, 20),
                       rng.integers(0, h, 20)):
        b = int(fw.Bp[n, p * h + i]) & 0xFF
        lo, hi = (b & 15) - 16 * (b & 8 > 0), (b >> 4) - 16 * (b & 128 > 0)
        assert (lo, hi) == (codes[n, p * 2 * h + i], codes[n, p * 2 * h + h + i])
    # unit scales and sums; the unit sums add up to the model's block wsum
    for u in range(kl.n_units):
        k = u * kl.unit
        want = case.scales[:, k // L.group_w] if k < L.K_ext else 0
        np.testing.assert_array_equal(fw.sw[u], want)
        np.testing.assert_array_equal(fw.ws[u], codes[:, k:k + kl.unit].astype(int).sum(1))
    per_block = L.block // kl.unit
    blocks = fw.ws[: L.K_ext // kl.unit].reshape(-1, per_block, N).sum(axis=1).T
    np.testing.assert_array_equal(blocks, case.wsum)


def test_param_stride():
    for M in itertools.chain(range(0, 40), (300, 8192)):
        s = param_stride(M)
        assert s >= M and s % 16 == 0 and s - M < 16 + 16 * (M == 0)
