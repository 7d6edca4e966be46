"""Activation quantization kernel: implements ``reference.prepare_activations`` followed by
``reference.quantize_activations``, written in the layout the GEMMs read.

One program per (token row, activation group): one chunked pass for the range, one to write
codes; float32 arithmetic with IEEE division (``div_rn``) and round-half-even (the 1.5 * 2^23
trick, exact for |y| < 2^22, which |x / scale| <= qmax guarantees), so codes are bit-identical
to the reference.

Outputs (see :mod:`.layout`):

* ``q`` int8 ``[M, KX]``: stored code ``q - off`` (``off`` = 128 for 8 bits, 0 for 4 bits: the
  int8 MMA is signed, and ``sum((q-z) w) = sum((q-off) w) - (z-off) sum(w)``). Columns
  ``K_pad + j`` (``j < rank``) repeat column ``j``. Padding columns (``K..K_pad``,
  ``K_pad + rank .. K_pad + r_pad``) hold their unit's stored zero point, so they contribute
  exactly 0 whatever the weight there; columns past ``K_ext`` hold 0 with zero point 0.
* ``sa`` float32 ``[n_units, ldp]`` and ``za`` int32 ``[n_units, ldp]`` (unit-major, so the
  GEMM epilogue reads ``BM`` contiguous values): scale and stored zero point ``z - off`` of the
  group each unit lies in; 0 past ``K_ext``. A group holding a NaN or an infinity gets a NaN
  scale; every output of its row sums all units, so the whole output row is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds y to nearest, ties to even


@triton.jit
def _rint(y):
    return (y + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def act_quant_kernel(a_ptr, perm_ptr, ascale_ptr, q_ptr, sa_ptr, za_ptr,
                     K, stride_am, K_pad, rank, r_pad, K_ext, KX, group, n_groups, unit, n_units,
                     ldp, qmax, off, has_perm, has_scale, CH: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    a_row = a_ptr + row.to(tl.int64) * stride_am
    q_row = q_ptr + row.to(tl.int64) * KX
    lanes = tl.arange(0, CH)
    qmax_f = qmax.to(tl.float32)
    g0 = g * group
    g1 = tl.minimum(g0 + group, K)  # real channels of this group
    last = g == n_groups - 1
    # the last group also owns the padding up to K_pad and r_pad
    own_main = tl.where(last, K_pad, tl.minimum(g0 + group, K_pad))
    own_ext = tl.where(last, r_pad, tl.minimum(g0 + group, r_pad))
    # pass 1: range of the group (0 always inside), non-finite detection
    lo = tl.full([], 0.0, tl.float32)
    hi = tl.full([], 0.0, tl.float32)
    bad = tl.full([], 0, tl.int32)
    for c0 in range(g0, g1, CH):
        offs = c0 + lanes
        m = offs < g1
        src = offs
        if has_perm:
            src = tl.load(perm_ptr + offs, mask=m, other=0).to(tl.int32)
        x = tl.load(a_row + src, mask=m, other=0.0).to(tl.float32)
        if has_scale:
            x = x * tl.load(ascale_ptr + offs, mask=m, other=0.0)
        nonfinite = (x != x) | (tl.abs(x) == float("inf"))
        bad = bad | tl.max(nonfinite.to(tl.int32), 0)
        lo = tl.minimum(lo, tl.min(tl.where(m, x, 0.0), 0))
        hi = tl.maximum(hi, tl.max(tl.where(m, x, 0.0), 0))
    s = tl.math.div_rn(hi - lo, qmax_f)
    s = tl.where(s == 0.0, 1.0, s)
    z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), qmax_f)
    z = tl.where(z == z, z, 0.0)
    zs = z.to(tl.int32) - off
    # pass 2: codes, the salient copy, padding columns at the zero point
    for c0 in range(g0, own_main, CH):
        offs = c0 + lanes
        real = offs < g1
        src = offs
        if has_perm:
            src = tl.load(perm_ptr + offs, mask=real, other=0).to(tl.int32)
        x = tl.load(a_row + src, mask=real, other=0.0).to(tl.float32)
        if has_scale:
            x = x * tl.load(ascale_ptr + offs, mask=real, other=0.0)
        y = _rint(tl.math.div_rn(x, s)) + z
        y = tl.minimum(tl.maximum(y, 0.0), qmax_f)
        y = tl.where(y == y, y, 0.0)
        code = tl.where(real, y.to(tl.int32) - off, zs).to(tl.int8)
        tl.store(q_row + offs, code, mask=offs < own_main)
        code_ext = tl.where(offs < rank, code, zs.to(tl.int8))
        tl.store(q_row + K_pad + offs, code_ext, mask=offs < own_ext)
    # parameters of the units this group owns, main and extended. A non-finite value makes the
    # group's scale NaN: every output column sums every unit, so the whole output row is NaN.
    s = tl.where(bad != 0, float("nan"), s)
    for u0 in range(g0 // unit, own_main // unit, CH):
        us = u0 + lanes
        mu = us < own_main // unit
        tl.store(sa_ptr + us * ldp + row, s + tl.zeros([CH], tl.float32), mask=mu)
        tl.store(za_ptr + us * ldp + row, zs + tl.zeros([CH], tl.int32), mask=mu)
    for u0 in range((K_pad + g0) // unit, (K_pad + own_ext) // unit, CH):
        us = u0 + lanes
        mu = us < (K_pad + own_ext) // unit
        tl.store(sa_ptr + us * ldp + row, s + tl.zeros([CH], tl.float32), mask=mu)
        tl.store(za_ptr + us * ldp + row, zs + tl.zeros([CH], tl.int32), mask=mu)
    # columns and units past the extended K (alignment of the fast path): contribute nothing
    if last:
        for c0 in range(K_ext, KX, CH):
            offs = c0 + lanes
            tl.store(q_row + offs, tl.zeros([CH], tl.int8), mask=offs < KX)
        for u0 in range(K_ext // unit, n_units, CH):
            us = u0 + lanes
            mu = us < n_units
            tl.store(sa_ptr + us * ldp + row, tl.zeros([CH], tl.float32), mask=mu)
            tl.store(za_ptr + us * ldp + row, tl.zeros([CH], tl.int32), mask=mu)
