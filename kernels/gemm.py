"""Fast SerqMatMul GEMM on int8 tensor cores: implements ``reference.serq_matmul`` (the product
of ``quantize_activations``' codes with the extended weight) for 4-bit weights, blocks a multiple
of 32.

Inputs are :mod:`.quant`'s buffers and :mod:`.repack`'s weights. The K loop walks pairs of
``2 * HALF`` extended rows -- main rows and the salient ``R`` rows alike, one loop of ``KX``.
Each pair is one packed ``[BN, HALF]`` byte tile: its low nibbles are the first MMA's operand,
its high nibbles the second's, each obtained with arithmetic shifts only (no interleave, no
register shuffle). ``tl.dot`` int8 x int8 -> int32 is exact; per unit the epilogue adds
``scale_a * scale_w * (acc - zero_a * wsum)`` to a float32 accumulator. ``UNITS_PER_PAIR`` is 1
(one unit = the pair: one epilogue on the sum of both MMAs) or 2 (each MMA is its own unit).

Split-K (decode): program axis 2 takes ``pairs_per_split`` consecutive pairs and writes float32
partials at ``y + pid_z * stride_ys``; :func:`splitk_reduce_kernel` sums them, adds the bias and
casts. With one split the GEMM adds the bias and writes ``Y`` in its dtype itself.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _epilogue(acc, d, u, sa_ptr, za_ptr, sw_ptr, ws_ptr, rm, rn, ldp, N):
    sa = tl.load(sa_ptr + u * ldp + rm)
    za = tl.load(za_ptr + u * ldp + rm)
    sw = tl.load(sw_ptr + u * N + rn)
    ws = tl.load(ws_ptr + u * N + rn)
    d = d - za[:, None] * ws[None, :]
    return acc + d.to(tl.float32) * (sa[:, None] * sw[None, :])


@triton.jit
def serq_gemm_kernel(q_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, ws_ptr, bias_ptr, y_ptr,
                     M, N, ldq, ldw, ldp, n_pairs, pairs_per_split, stride_ym, stride_ys,
                     has_bias,
                     BM: tl.constexpr, BN: tl.constexpr, HALF: tl.constexpr,
                     UNITS_PER_PAIR: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_z = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rmc = tl.minimum(rm, M - 1)  # clamped rows/columns: unmasked loads, masked store
    rnc = tl.minimum(rn, N - 1)
    rk = tl.arange(0, HALF)
    a_ptrs = q_ptr + rmc.to(tl.int64)[:, None] * ldq + rk[None, :]
    w_ptrs = w_ptr + rnc.to(tl.int64)[:, None] * ldw + rk[None, :]
    p_begin = pid_z * pairs_per_split
    p_end = tl.minimum(p_begin + pairs_per_split, n_pairs)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for p in range(p_begin, p_end):
        a_lo = tl.load(a_ptrs + p * (2 * HALF))
        a_hi = tl.load(a_ptrs + p * (2 * HALF) + HALF)
        wb = tl.load(w_ptrs + p * HALF)
        w_lo = (wb << 4) >> 4
        w_hi = wb >> 4
        d = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
        if UNITS_PER_PAIR == 1:
            d = tl.dot(a_hi, tl.trans(w_hi), acc=d, out_dtype=tl.int32)
            acc = _epilogue(acc, d, p, sa_ptr, za_ptr, sw_ptr, ws_ptr, rmc, rnc, ldp, N)
        else:
            acc = _epilogue(acc, d, 2 * p, sa_ptr, za_ptr, sw_ptr, ws_ptr, rmc, rnc, ldp, N)
            d = tl.dot(a_hi, tl.trans(w_hi), out_dtype=tl.int32)
            acc = _epilogue(acc, d, 2 * p + 1, sa_ptr, za_ptr, sw_ptr, ws_ptr, rmc, rnc, ldp, N)
    if has_bias:
        acc += tl.load(bias_ptr + rnc)[None, :]
    y_ptrs = y_ptr + pid_z.to(tl.int64) * stride_ys + rm.to(tl.int64)[:, None] * stride_ym \
        + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def splitk_reduce_kernel(p_ptr, bias_ptr, y_ptr, MN, N, n_split, stride_ps, has_bias,
                         BLOCK: tl.constexpr):
    """Sum of the float32 split-K partials ``[n_split, M, N]`` (+ bias), cast to Y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for z in range(0, n_split):
        acc += tl.load(p_ptr + z * stride_ps + offs, mask=m, other=0.0)
    if has_bias:
        acc += tl.load(bias_ptr + offs % N, mask=m, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m)
