"""The executable specification of ``com.serq::SerqMatMul`` (version 1).

Everything that produces or consumes SerqMatMul data -- the converter passes, the CPU kernel,
the GPU kernels -- is tested against the functions in this module. They are written for
clarity, in numpy, and are the single place where the op's semantics are defined.

Notation
--------
The op replaces ``Y = X @ W`` with ``X: [..., K]`` and ``W: [K, N]`` (Optimum's layout). The
converter has already flattened and permuted the weight (``W^ = diag(s) W [pi, :]``), so the op
sees ``X^``, the activations in permuted, flattened channel order (produced either by the graph
or at run time from the optional ``act_scale`` / ``act_perm`` inputs).

Groups and padding (K need not be a multiple of any group size)
---------------------------------------------------------------
* ``group_w`` (even, >= 2): weight groups of ``group_w`` consecutive rows along K. The main
  weight covers ``K_pad = ceil(K / group_w) * group_w`` rows; rows ``K .. K_pad-1`` are padding
  with code 0. The last real group may be partial: its scale is computed over its real rows.
* ``rank`` r (0 <= r <= K): the salient correction ``R`` covers ``r_pad = ceil(r / group_w) *
  group_w`` rows, rows ``r .. r_pad-1`` are padding with code 0. ``R`` has one scale per output
  column, stored once per weight group of the extended part (repeated), so the whole extended
  weight has uniform groups of ``group_w``.
* Extended K: ``K_ext = K_pad + r_pad``. Extended row ``K_pad + j`` (``j < r``) multiplies
  activation channel ``j`` -- the same quantized value as main row ``j``.
* ``group_a``: activation groups of ``group_a`` consecutive channels of ``X^`` (0: the whole row,
  i.e. one group of K). The last group may be partial; its statistics use its real channels only.
  ``group_a`` must be 0, a multiple of ``group_w``, or a divisor of ``group_w``.
* Blocks: ``block = group_w if group_a == 0 else min(group_a, group_w)``. Inside a block both the
  activation scale/zero and the weight scale are constant, so a block's contribution is
  ``scale_a * scale_w * (sum(q_a * q_w) - zero_a * sum(q_w))`` with exact integer sums. ``wsum``
  holds ``sum(q_w)`` per (column, block). Blocks lying wholly in padding contribute nothing and
  kernels may skip them.

Quantizers (all arithmetic in float32, rounding half to even as ``np.rint`` / C ``nearbyint``)
------------------------------------------------------------------------------------------------
* Activations, dynamic per token and group, asymmetric, ``bits_a`` in {4, 8}, ``qmax = 2^b - 1``:
  ``lo = min(0, min(x))``, ``hi = max(0, max(x))`` (the range always contains 0, so 0 is exact and
  ``zero`` lies in [0, qmax]); ``scale = (hi - lo) / qmax`` (1 if that is 0);
  ``zero = clip(rint(-lo / scale), 0, qmax)``; ``q = clip(rint(x / scale) + zero, 0, qmax)``.
  A token row holding a NaN or an infinity (after ``act_scale``) yields an all-NaN output row.
* Weights, offline, symmetric, ``bits_w`` in {4, 8}: the op accepts any code in
  ``[-2^(b-1), 2^(b-1) - 1]`` with any positive scale. The converter's rule, ``qmax = 2^(b-1) - 1``:
  ``scale = c * max|w| / qmax`` (1 if that is 0), ``q = clip(rint(w / scale), -qmax - 1, qmax)``,
  with ``c = 1`` (and codes down to ``-qmax`` only) for absmax scales, or ``c`` searched per
  group and column to minimize the rounding error (:func:`weight_scale`).

Operator (domain ``com.serq``, version 1)
-----------------------------------------
Inputs:
  0. ``A``       float32 | float16 ``[..., K]``.
  1. ``B``       uint8. ``bits_w == 4``: ``[N, K_ext / 2]``, element k of row n in byte ``k // 2``,
                 low nibble for even k, stored offset by 8 (nibble = code + 8).
                 ``bits_w == 8``: ``[N, K_ext]``, two's-complement int8 codes.
  2. ``scales``  float32 ``[N, K_ext / group_w]``.
  3. ``wsum``    int32 ``[N, K_ext / block]``: sums of the weight codes of each block.
  4. ``act_scale`` (optional) float32 ``[K]``: multiplier in permuted order.
  5. ``act_perm``  (optional) int32 | int64 ``[K]``: a permutation of 0..K-1.
                 ``X^[..., j] = A[..., act_perm[j]] * act_scale[j]`` (each part only if given).
  6. ``bias``    (optional) float32 ``[N]``.
Attributes: ``K``, ``N``, ``rank``, ``group_w``, ``group_a``, ``bits_a``, ``bits_w`` (ints) and
``scheme`` (string, ``"int"``; ``"mxfp4"`` is reserved).
Output: ``Y`` ``[..., N]`` in A's dtype,
``Y = sum_k deq_a(X^)[k'] * scales[n, k // group_w] * q_w[n, k] (+ bias)`` over extended rows k,
with ``k' = k`` for ``k < K``, ``k' = k - K_pad`` for ``K_pad <= k < K_pad + r``; accumulation in
float32 or wider.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN = "com.serq"
OP_TYPE = "SerqMatMul"
OP_VERSION = 1
SCHEMES = ("int",)


class ContractError(ValueError):
    """Data that does not satisfy the SerqMatMul contract."""


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def block_size(group_w: int, group_a: int) -> int:
    """Span over which both the activation and the weight scale are constant."""
    return group_w if group_a == 0 else min(group_a, group_w)


def check_groups(group_w: int, group_a: int) -> None:
    if group_w < 2 or group_w % 2:
        raise ContractError(f"group_w must be an even number >= 2, got {group_w}")
    if group_a < 0:
        raise ContractError(f"group_a must be >= 0 (0 = whole row), got {group_a}")
    if group_a and group_a % group_w and group_w % group_a:
        raise ContractError(
            f"group_a ({group_a}) must be 0, a multiple of group_w ({group_w}) or a divisor of it"
        )


@dataclass(frozen=True)
class Layout:
    """Derived sizes of one SerqMatMul."""

    K: int
    N: int
    rank: int
    group_w: int
    group_a: int
    bits_w: int = 4
    bits_a: int = 8

    def __post_init__(self) -> None:
        check_groups(self.group_w, self.group_a)
        if not 0 <= self.rank <= self.K:
            raise ContractError(f"rank must be in [0, K={self.K}], got {self.rank}")
        if self.bits_w not in (4, 8):
            raise ContractError(f"bits_w must be 4 or 8, got {self.bits_w}")
        if self.bits_a not in (4, 8):
            raise ContractError(f"bits_a must be 4 or 8, got {self.bits_a}")

    @property
    def K_pad(self) -> int:
        return _ceil_to(self.K, self.group_w)

    @property
    def r_pad(self) -> int:
        return _ceil_to(self.rank, self.group_w)

    @property
    def K_ext(self) -> int:
        return self.K_pad + self.r_pad

    @property
    def block(self) -> int:
        return block_size(self.group_w, self.group_a)

    @property
    def group_a_eff(self) -> int:
        return self.group_a if self.group_a else self.K

    def attributes(self, scheme: str = "int") -> dict:
        return dict(K=self.K, N=self.N, rank=self.rank, group_w=self.group_w,
                    group_a=self.group_a, bits_a=self.bits_a, bits_w=self.bits_w, scheme=scheme)


# --------------------------------------------------------------------------- quantizers


def quantize_activations(x: np.ndarray, bits: int, group: int):
    """Dynamic asymmetric per-token, per-group quantization of ``x: [M, K]`` (float32).

    Returns ``(q uint8 [M, K], scale float32 [M, G], zero int32 [M, G])`` with
    ``G = ceil(K / group)`` (``group == 0``: one group per row). Non-finite rows get scale NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    g = group if group else K
    G = -(-K // g)
    qmax = np.float32(2**bits - 1)
    q = np.zeros((M, K), dtype=np.uint8)
    scale = np.zeros((M, G), dtype=np.float32)
    zero = np.zeros((M, G), dtype=np.int32)
    for j in range(G):
        xs = x[:, j * g : min((j + 1) * g, K)]
        lo = np.minimum(xs.min(axis=1), np.float32(0))
        hi = np.maximum(xs.max(axis=1), np.float32(0))
        s = ((hi - lo) / qmax).astype(np.float32)
        s = np.where(s == 0, np.float32(1), s).astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, qmax).astype(np.float32)
        with np.errstate(invalid="ignore"):
            qq = np.clip(np.rint(xs / s[:, None]) + z[:, None], 0, qmax)
        q[:, j * g : min((j + 1) * g, K)] = np.nan_to_num(qq).astype(np.uint8)
        scale[:, j] = s
        zero[:, j] = np.nan_to_num(z).astype(np.int32)
    bad = ~np.isfinite(x).all(axis=1)
    scale[bad] = np.nan
    return q, scale, zero


def dequantize_activations(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int):
    M, K = q.shape
    g = group if group else K
    idx = np.arange(K) // g
    return (q.astype(np.float64) - zero[:, idx]) * scale[:, idx].astype(np.float64)


# Candidate clipping ratios of the scale search: 1, 63/64, ..., 1/2 (7/8 makes -qmax-1 reachable
# exactly at the extreme of a negative-heavy group).
CLIP_RATIOS = (1.0 - np.arange(33, dtype=np.float64) / 64).astype(np.float32)


def weight_scale(ws: np.ndarray, bits: int, search: bool = False) -> tuple[np.ndarray, int]:
    """Per-column scale of one weight group ``ws: [g, N]`` and the lowest code allowed.

    ``search=False``: ``max|w| / qmax``, codes in ``[-qmax, qmax]``. ``search=True``: the ratio
    ``c`` of :data:`CLIP_RATIOS` minimizing ``sum_k (w - c max|w|/qmax * q)^2`` per column
    (float64 error; the first, largest ratio wins ties), codes in ``[-qmax - 1, qmax]``; ``c = 1``
    is the absmax rule, so the search never does worse on that error. A zero scale becomes 1.
    """
    ws = np.asarray(ws, dtype=np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    am = np.abs(ws).max(axis=0)
    if not search:
        s = (am / qmax).astype(np.float32)
        return np.where(s == 0, np.float32(1), s).astype(np.float32), -int(qmax)
    lo = -qmax - 1
    w64 = ws.astype(np.float64)
    best_s = best_e = None
    for c in CLIP_RATIOS:
        s = (am * c / qmax).astype(np.float32)
        s = np.where(s == 0, np.float32(1), s).astype(np.float32)
        q = np.clip(np.rint(ws / s), lo, qmax)
        d = w64 - q.astype(np.float64) * s.astype(np.float64)
        e = (d * d).sum(axis=0)
        if best_e is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s = np.where(better, s, best_s)
            best_e = np.where(better, e, best_e)
    return best_s.astype(np.float32), int(lo)


def quantize_weight(w: np.ndarray, bits: int, group: int, *, search: bool = False):
    """Symmetric round-to-nearest quantization of ``w: [K, N]`` in groups of ``group`` rows.

    ``group == 0``: one group over all rows (per output column). Returns
    ``(q int8 [K, N], scale float32 [G, N])``; the last group may be partial. ``search``: each
    group's scale as :func:`weight_scale` chooses it.
    """
    w = np.asarray(w, dtype=np.float32)
    K, N = w.shape
    g = group if group else K
    G = -(-K // g)
    q = np.zeros((K, N), dtype=np.int8)
    scale = np.zeros((G, N), dtype=np.float32)
    for j in range(G):
        rows = slice(j * g, min((j + 1) * g, K))
        s, lo = weight_scale(w[rows], bits, search)
        q[rows] = np.clip(np.rint(w[rows] / s), lo, 2 ** (bits - 1) - 1).astype(np.int8)
        scale[j] = s
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    K = q.shape[0]
    g = group if group else K
    return q.astype(np.float32) * scale[np.arange(K) // g]


# --------------------------------------------------------------------------- packing


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """``codes: [N, K]`` int in [-8, 7], K even -> uint8 ``[N, K/2]`` (low nibble = even k)."""
    codes = np.asarray(codes)
    if codes.shape[-1] % 2:
        raise ContractError("pack_int4 needs an even number of codes per row")
    if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
        raise ContractError("4-bit codes must lie in [-8, 7]")
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int8)
    out[..., 0::2] = lo
    out[..., 1::2] = hi
    return out


def pack_weight_codes(codes_nk: np.ndarray, bits_w: int) -> np.ndarray:
    if bits_w == 4:
        return pack_int4(codes_nk)
    return np.ascontiguousarray(codes_nk.astype(np.int8)).view(np.uint8)


def unpack_weight_codes(B: np.ndarray, bits_w: int) -> np.ndarray:
    if bits_w == 4:
        return unpack_int4(B)
    return np.asarray(B, dtype=np.uint8).view(np.int8)


# --------------------------------------------------------------------------- SERQ weights


@dataclass
class SerqWeights:
    """The op's weight inputs (and, from :func:`build_serq_weights`, the residual they came
    from, for diagnostics)."""

    layout: Layout
    B: np.ndarray  # uint8
    scales: np.ndarray  # float32 [N, K_ext / group_w]
    wsum: np.ndarray  # int32 [N, K_ext / block]
    residual: np.ndarray | None  # float32 [K, N]: the main weight before quantization

    def initializers(self) -> dict:
        return {"B": self.B, "scales": self.scales, "wsum": self.wsum}


def block_sums(codes_nk: np.ndarray, block: int) -> np.ndarray:
    N, Kx = codes_nk.shape
    return codes_nk.astype(np.int32).reshape(N, Kx // block, block).sum(axis=2).astype(np.int32)


def salient_split(w_hat: np.ndarray, rank: int, bits_w: int):
    """SERQ's single-factor reconstruction: ``R = Qw_R(W^[:r])`` with one scale per column.

    Returns ``(r_codes int8 [r, N], r_scale float32 [N], residual float32 [K, N])`` where the
    residual is ``W^`` with its first r rows replaced by ``W^[:r] - deq(R)``: the main weight
    carries what R could not represent, so both quantization errors meet in one GEMM.
    """
    w_hat = np.asarray(w_hat, dtype=np.float32)
    residual = w_hat.copy()
    N = w_hat.shape[1]
    if rank == 0:
        return np.zeros((0, N), np.int8), np.ones(N, np.float32), residual
    r_codes, r_scale = quantize_weight(w_hat[:rank], bits_w, 0)
    residual[:rank] = w_hat[:rank] - dequantize_weight(r_codes, r_scale, 0)
    return r_codes, r_scale[0], residual


def assemble_weights(layout: Layout, main_codes: np.ndarray, main_scales: np.ndarray,
                     r_codes: np.ndarray, r_scale: np.ndarray) -> SerqWeights:
    """Lay out main codes ``[K, N]`` (scales ``[K_pad/group_w, N]``) and R codes ``[r, N]``
    (scale ``[N]``) as the op's ``B``, ``scales`` and ``wsum``."""
    L = layout
    if main_codes.shape != (L.K, L.N) or r_codes.shape != (L.rank, L.N):
        raise ContractError(f"codes {main_codes.shape}/{r_codes.shape} do not fit {L}")
    codes = np.zeros((L.N, L.K_ext), dtype=np.int8)
    codes[:, : L.K] = main_codes.T
    codes[:, L.K_pad : L.K_pad + L.rank] = r_codes.T
    n_main, n_r = L.K_pad // L.group_w, L.r_pad // L.group_w
    scales = np.empty((L.N, n_main + n_r), dtype=np.float32)
    scales[:, :n_main] = main_scales.T
    scales[:, n_main:] = np.asarray(r_scale, np.float32)[:, None]
    return SerqWeights(layout=L, B=pack_weight_codes(codes, L.bits_w),
                       scales=np.ascontiguousarray(scales), wsum=block_sums(codes, L.block),
                       residual=None)


def build_serq_weights(w_hat: np.ndarray, layout: Layout) -> SerqWeights:
    """SERQ offline weights from the flattened, permuted weight ``W^: [K, N]`` (RTN main)."""
    L = layout
    w_hat = np.asarray(w_hat, dtype=np.float32)
    if w_hat.shape != (L.K, L.N):
        raise ContractError(f"weight shape {w_hat.shape} != (K, N) = ({L.K}, {L.N})")
    r_codes, r_scale, residual = salient_split(w_hat, L.rank, L.bits_w)
    main_codes, main_scales = quantize_weight(residual, L.bits_w, L.group_w)
    wts = assemble_weights(L, main_codes, main_scales, r_codes, r_scale)
    wts.residual = residual
    return wts


def effective_weight(wts: SerqWeights) -> np.ndarray:
    """The float weight the op applies to ``deq(Qa(X^))``: ``deq(Wq) + [R; 0]``, shape [K, N]."""
    L = wts.layout
    codes = unpack_weight_codes(wts.B, L.bits_w).astype(np.float64)
    w = codes * np.repeat(wts.scales.astype(np.float64), L.group_w, axis=1)
    out = w[:, : L.K].T.copy()
    out[: L.rank] += w[:, L.K_pad : L.K_pad + L.rank].T
    return out


# --------------------------------------------------------------------------- the op


def prepare_activations(a2d: np.ndarray, act_scale=None, act_perm=None) -> np.ndarray:
    """``X^ = A[:, perm] * act_scale`` in float32 (each part only if given)."""
    x = np.asarray(a2d).astype(np.float32)
    if act_perm is not None:
        x = x[:, np.asarray(act_perm, dtype=np.int64)]
    if act_scale is not None:
        x = (x * np.asarray(act_scale, dtype=np.float32)[None, :]).astype(np.float32)
    return x


def check_inputs(A, B, scales, wsum, act_scale, act_perm, bias, L: Layout) -> None:
    if A.shape[-1] != L.K:
        raise ContractError(f"A's last dimension is {A.shape[-1]}, the op expects K={L.K}")
    exp_b = (L.N, L.K_ext // 2) if L.bits_w == 4 else (L.N, L.K_ext)
    if B.shape != exp_b or B.dtype != np.uint8:
        raise ContractError(f"B must be uint8 {exp_b}, got {B.dtype} {B.shape}")
    if scales.shape != (L.N, L.K_ext // L.group_w):
        raise ContractError(f"scales must be [{L.N}, {L.K_ext // L.group_w}], got {scales.shape}")
    if wsum.shape != (L.N, L.K_ext // L.block):
        raise ContractError(f"wsum must be [{L.N}, {L.K_ext // L.block}], got {wsum.shape}")
    sc = np.asarray(scales)
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        raise ContractError("scales must be finite and > 0")
    if act_scale is not None and np.shape(act_scale) != (L.K,):
        raise ContractError(f"act_scale must be [{L.K}]")
    if act_perm is not None:
        p = np.asarray(act_perm)
        if p.shape != (L.K,) or not np.array_equal(np.sort(p), np.arange(L.K)):
            raise ContractError(f"act_perm must be a permutation of 0..{L.K - 1}")
    if bias is not None and np.shape(bias) != (L.N,):
        raise ContractError(f"bias must be [{L.N}]")
    codes = unpack_weight_codes(B, L.bits_w)
    if not np.array_equal(block_sums(codes, L.block), wsum):
        raise ContractError("wsum does not match the block sums of B's codes")


def serq_matmul(A, B, scales, wsum, act_scale=None, act_perm=None, bias=None, *, K, N, rank,
                group_w, group_a, bits_a, bits_w, scheme="int") -> np.ndarray:
    """Reference SerqMatMul: ``Y[..., N]`` in A's dtype (computed in float64)."""
    if scheme not in SCHEMES:
        raise ContractError(f"scheme {scheme!r} is not supported (supported: {SCHEMES})")
    L = Layout(K=K, N=N, rank=rank, group_w=group_w, group_a=group_a, bits_w=bits_w,
               bits_a=bits_a)
    A = np.asarray(A)
    check_inputs(A, B, scales, wsum, act_scale, act_perm, bias, L)
    lead = A.shape[:-1]
    x = prepare_activations(A.reshape(-1, K), act_scale, act_perm)
    q, sa, za = quantize_activations(x, bits_a, group_a)
    xd = dequantize_activations(q, sa, za, group_a)  # [M, K]; NaN rows stay NaN
    x_ext = np.zeros((xd.shape[0], L.K_ext), dtype=np.float64)
    x_ext[:, :K] = xd
    x_ext[:, L.K_pad : L.K_pad + rank] = xd[:, :rank]
    codes = unpack_weight_codes(B, bits_w).astype(np.float64)
    w_ext = codes * np.repeat(scales.astype(np.float64), group_w, axis=1)  # [N, K_ext]
    y = x_ext @ w_ext.T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :]
    return y.reshape(lead + (N,)).astype(A.dtype)
