"""Generic SerqMatMul GEMM on CUDA cores: implements ``reference.serq_matmul`` for every layout
the contract allows that the fast path cannot take (8-bit weights; blocks of 2..16 or not a
multiple of 32). Correct first, not fast: it reads the reference ``B`` and ``scales`` as they
are (no repack) and :mod:`.quant`'s codes with units of one block.

Each tile of ``BK`` extended rows is dequantized to float32 on both sides --
``(q - z) * scale_a`` and ``code * scale_w`` (the integer differences and codes are exact in
float32) -- and multiplied with an IEEE float32 ``tl.dot`` (no TF32). NaN activation scales
propagate to the whole row as the contract requires.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def serq_generic_kernel(q_ptr, b_ptr, sa_ptr, za_ptr, sc_ptr, bias_ptr, y_ptr,
                        M, N, K_ext, ldq, ldb, lds, ldp, block, group_w, stride_ym, has_bias,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        BITS_W: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rmc = tl.minimum(rm, M - 1)
    rnc = tl.minimum(rn, N - 1)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K_ext, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K_ext
        kc = tl.minimum(kk, K_ext - 1)
        u = kc // block
        q = tl.load(q_ptr + rmc.to(tl.int64)[:, None] * ldq + kc[None, :])
        za = tl.load(za_ptr + u[None, :] * ldp + rmc[:, None])
        sa = tl.load(sa_ptr + u[None, :] * ldp + rmc[:, None])
        a = (q.to(tl.int32) - za).to(tl.float32) * sa
        a = tl.where(km[None, :], a, 0.0)
        if BITS_W == 4:
            byte = tl.load(b_ptr + rnc.to(tl.int64)[None, :] * ldb + (kc // 2)[:, None])
            nib = tl.where((kc % 2 == 0)[:, None], byte & 15, byte >> 4)
            code = nib.to(tl.int32) - 8
        else:
            code = tl.load(b_ptr + rnc.to(tl.int64)[None, :] * ldb + kc[:, None]).to(tl.int32)
        sw = tl.load(sc_ptr + rnc[None, :] * lds + (kc // group_w)[:, None])
        w = tl.where(km[:, None], code.to(tl.float32) * sw, 0.0)
        acc += tl.dot(a, w, input_precision="ieee")
    if has_bias:
        acc += tl.load(bias_ptr + rnc)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
