"""One-time repack of SerqMatMul's constant initializers into the fast GEMM's layout.

The model file keeps ``reference.py``'s format; the GPU kernel repacks ``B``, ``scales`` and
``wsum`` once when it is created (the C++ side implements exactly this function). The layout is
chosen so the GEMM unpacks 4-bit weights with one shift each and no register shuffles:

* ``Bp`` int8 ``[N, KX / 2]``: the extended K (zero-padded to ``KX``) is cut into pairs of
  ``2 * half`` rows; byte ``i`` of pair ``p`` holds row ``p*2h + i`` in its low nibble and row
  ``p*2h + h + i`` in its high nibble, both two's complement. So ``(b << 4) >> 4`` (arithmetic)
  is the first MMA's operand, ``b >> 4`` the second's, each a plain ``[half, BN]`` tile.
* ``sw`` float32 ``[n_units, N]``: the weight scale of each unit (0 in padding units).
* ``ws`` int32 ``[n_units, N]``: the sum of the weight codes of each unit (``wsum`` at unit
  granularity, recomputed from the codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serq_onnx import reference as ref

from .layout import KernelLayout


@dataclass
class FastWeights:
    """Repacked constant inputs of the fast path (``numpy``)."""

    klayout: KernelLayout
    Bp: np.ndarray  # int8 [N, KX / 2]
    sw: np.ndarray  # float32 [n_units, N]
    ws: np.ndarray  # int32 [n_units, N]


def repack_fast(B: np.ndarray, scales: np.ndarray, layout: ref.Layout) -> FastWeights:
    """Repack reference ``B`` (4-bit) and ``scales`` for the fast GEMM."""
    kl = KernelLayout(layout)
    if kl.path != "fast":
        raise ref.ContractError(f"layout {layout} has no fast-path weight layout")
    L, h, U = layout, kl.half, kl.unit
    codes = np.zeros((L.N, kl.KX), np.int8)
    codes[:, : L.K_ext] = ref.unpack_int4(B)
    pairs = codes.reshape(L.N, kl.n_pairs, 2, h)
    lo = pairs[:, :, 0, :].astype(np.uint8) & 0x0F
    hi = pairs[:, :, 1, :].astype(np.uint8) << 4
    Bp = (lo | hi).reshape(L.N, kl.KX // 2).view(np.int8)
    n_real = L.K_ext // U
    sw = np.zeros((kl.n_units, L.N), np.float32)
    sw[:n_real] = scales[:, (np.arange(n_real) * U) // L.group_w].T
    ws = codes.astype(np.int32).reshape(L.N, kl.n_units, U).sum(axis=2).T
    return FastWeights(kl, np.ascontiguousarray(Bp), np.ascontiguousarray(sw),
                       np.ascontiguousarray(ws.astype(np.int32)))


def unpack_fast(fw: FastWeights) -> np.ndarray:
    """Inverse of the nibble arrangement: int8 codes ``[N, KX]`` (for tests and diagnostics)."""
    kl = fw.klayout
    b = fw.Bp.reshape(kl.layout.N, kl.n_pairs, kl.half)
    lo = (b << 4) >> 4  # int8 arithmetic shifts, as the kernel does
    hi = b >> 4
    return np.stack([lo, hi], axis=2).reshape(kl.layout.N, kl.KX).astype(np.int8)
