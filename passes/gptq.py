"""GPTQ for the residual main weight (Frantar et al., 2023), SERQ's default over round to nearest.

The main weight multiplies ``X^ = (X / s)[..., pi]``, so its Hessian is that of ``X^``:
``H^ = D P H P^T D`` with ``H = sum_t x_t^T x_t`` from calibration (original channel order),
``P`` the saliency permutation and ``D = diag(1 / s[pi])``. Rows of ``W^`` (input channels) are
quantized in natural order -- the permutation already puts the salient channels first, and the
op needs each weight group to be ``group_w`` consecutive rows -- and each row's rounding error is
spread over the rows not yet quantized. A group's scale is taken from the error-updated weights
when the sweep reaches its first row (static groups), with ``reference.weight_scale`` (absmax
or the least-error search), so the codes and scales satisfy the op contract unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from serq_onnx import reference
from serq_onnx.errors import SerqError
from serq_onnx.plan import InputGroup, Plan

from ._base import PlanPass
from .quantize import pack_target, require_residuals


def layer_hessian(gram: np.ndarray, tokens: int, s: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The per-token Hessian of the layer input ``X^ = (X / s)[..., perm]`` from ``sum x^T x``.

    ``H^[i, j] = H[perm[i], perm[j]] / (s[perm[i]] s[perm[j]]) / tokens``, float64 ``[K, K]``.
    """
    perm = np.asarray(perm, np.int64)
    inv = (1.0 / np.asarray(s, np.float64))[perm]
    # Permuted first, in the Gram's dtype, then scaled in place: the same operations on each
    # entry as scaling first, with one float64 K x K array alive instead of three.
    h = np.asarray(gram)[np.ix_(perm, perm)].astype(np.float64)
    h *= inv[:, None]
    h *= inv[None, :]
    h /= max(int(tokens), 1)
    return h


def _inverse_cholesky_upper(h: list[np.ndarray]) -> np.ndarray:
    """Upper ``U`` with ``h^-1 = U^T U``: one Cholesky of the reversed ``h``, one triangular
    inverse (``J L^-1 J`` for ``J h J = L L^T``), never forming ``h^-1`` itself. ``h``: a list
    holding the one reference to the Hessian, emptied once it is factored, so that at most
    four float64 ``K x K`` arrays are alive at a time (the inverse's input, its two LAPACK
    buffers and its result: 6 GiB at K = 14336)."""
    lower = np.linalg.cholesky(h[0][::-1, ::-1])
    h.clear()
    inv = np.linalg.inv(lower)  # dgesv against the identity, as solve(lower, eye) does
    del lower
    for i in range(inv.shape[0] - 1):  # lower-triangular: clear the rounding above, in place
        inv[i, i + 1:] = 0.0
    return np.ascontiguousarray(inv[::-1, ::-1])


def gptq_quantize(w: np.ndarray, hessian: np.ndarray | list[np.ndarray], bits: int, group: int,
                  *, damp: float = 0.01, block: int = 128,
                  search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``w: [K, N]`` (rows = input channels) against the input Hessian ``[K, K]``.

    Symmetric ``bits``-bit codes in groups of ``group`` rows (0: one group), like
    ``reference.quantize_weight``: returns ``(codes int8 [K, N], scales float32 [G, N])``.
    ``damp`` times the mean diagonal is added to the diagonal. Channels that calibration never
    saw (zero diagonal) are rounded to nearest and exchange no error with the others; they are
    not zeroed as in the GPTQ paper, since other text may well use them. ``search`` picks each
    group's scale by ``reference.weight_scale``'s clipping search on the error-updated rows.
    ``hessian`` given in a one-element list is the caller's to give up: it is modified and
    freed once factored instead of copied (``run_job``; float64 ``K x K``, 1.5 GiB at
    K = 14336).
    """
    W = np.array(w, dtype=np.float64)
    K, N = W.shape
    if isinstance(hessian, list):
        H = np.asarray(hessian.pop(), dtype=np.float64)
    else:
        H = np.array(hessian, dtype=np.float64)
    if H.shape != (K, K):
        raise SerqError(f"Hessian shape {H.shape} does not match the weight's K={K}")
    if not np.all(np.isfinite(H)):
        raise SerqError("the GPTQ Hessian holds NaN or infinite values")
    diag = np.arange(K)
    dead = H[diag, diag] == 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[diag[dead], diag[dead]] = 1
    H[diag, diag] += damp * H[diag, diag].mean()
    held = [H]
    del H
    try:
        U = _inverse_cholesky_upper(held)
    except np.linalg.LinAlgError:
        raise SerqError(f"the GPTQ Hessian is not positive definite with dampening {damp}; "
                        "use a larger gptq_damp or more calibration text") from None

    g = group if group else K
    # Whole groups per block, so a group's rows are up to date when its scale is computed.
    blk = g * max(1, block // g)
    qmax = np.float32(2 ** (bits - 1) - 1)
    codes = np.zeros((K, N), np.int8)
    scales = np.zeros((-(-K // g), N), np.float32)
    scale, lo = scales[0], -qmax
    for i1 in range(0, K, blk):
        i2 = min(i1 + blk, K)
        W1, U1 = W[i1:i2], U[i1:i2, i1:i2]
        E1 = np.zeros((i2 - i1, N))
        for i in range(i2 - i1):
            k = i1 + i
            if k % g == 0:
                rows = slice(k, min(k + g, K))
                scale, lo = reference.weight_scale(W[rows], bits, search)
                scales[k // g] = scale
            q = np.clip(np.rint(W1[i].astype(np.float32) / scale), lo, qmax)
            codes[k] = q
            err = (W1[i] - (q * scale).astype(np.float64)) / U1[i, i]
            W1[i + 1:] -= np.outer(U1[i, i + 1:], err)
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return codes, scales


@dataclass(frozen=True)
class GPTQJob:
    """One group's GPTQ: everything :func:`gptq_quantize` needs, nothing of the graph (so it
    can run in another process). The Hessian travels as its float32 Gram sums and the
    flattening (``layer_hessian``): half the bytes, and made only where it is used."""

    name: str
    w: np.ndarray
    gram: np.ndarray
    tokens: int
    s: np.ndarray
    perm: np.ndarray
    bits: int
    group: int
    damp: float
    search: bool


def run_job(job: GPTQJob) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of one group."""
    hessian = [layer_hessian(job.gram, job.tokens, job.s, job.perm)]
    return gptq_quantize(job.w, hessian, job.bits, job.group, damp=job.damp,
                         search=job.search)


# (run_job, jobs) -> each job's result, in order: the built-in map, or one over other processes.
GroupMapper = Callable[[Callable[[GPTQJob], tuple[np.ndarray, np.ndarray]], Iterable[GPTQJob]],
                       Iterator[tuple[np.ndarray, np.ndarray]]]


class GPTQPass(PlanPass):
    """Quantize every residual main weight with GPTQ and pack the op inputs.

    A drop-in for ``QuantizeWeightsPass`` when ``config.weight_quant == "gptq"``: it needs the
    calibration Gram matrices (``CalibratePass``) and the flattening (``FoldFlatteningPass``).
    Targets of one group share one input, hence one Hessian; they are quantized together (GPTQ
    treats output columns independently, so this equals quantizing them one by one). Groups
    are independent: ``mapper`` may run them elsewhere (``serq_onnx.distributed``).

    Where the Gram matrices did not all fit ``config.gram_memory_mib``, calibration left
    ``plan.gram_source`` instead: the groups are then quantized chunk by chunk, each chunk's
    Gram matrices collected from the saved float graph just before (through its runner, so
    ``--ray`` runs those sequences too) and freed once packed; the saved graph is removed when
    this pass ends, whether it succeeds or fails. ``gram_seconds``: the time those collections
    took.
    """

    def __init__(self, plan: Plan, progress: bool = True, mapper: GroupMapper | None = None):
        super().__init__(plan)
        self.progress = progress
        self.mapper = mapper  # None: the built-in map, group after group in this process
        self.gram_seconds = 0.0

    def requires(self, model: ir.Model) -> None:
        """Calibration Gram matrices, or the saved float graph to collect them from
        (CalibratePass with weight_quant gptq), scales and order (FoldFlatteningPass), residual
        main weights (SalientReconstructionPass)."""
        require_residuals(self)
        self.require_flattening()
        source = self.plan.gram_source
        later: set[int] = set()
        if source is not None:
            self.precondition(not source.closed, "the saved float graph of the Gram matrices "
                              "was removed; run CalibratePass again")
            self.precondition(source.names == [g.name for g in self.plan.groups],
                              "the plan's groups changed since CalibratePass saved the float "
                              "graph; run CalibratePass again")
            later = {i for chunk in source.chunks for i in chunk}
        missing = [g.name for i, g in enumerate(self.plan.groups)
                   if g.gram is None and i not in later]
        self.precondition(not missing, f"no calibration Gram matrix for "
                          f"{missing[0] if missing else ''}; run CalibratePass with "
                          "weight_quant 'gptq' first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self.plan.groups
        source = self.plan.gram_source
        chunks = source.chunks if source is not None else [list(range(len(groups)))]
        try:
            with tqdm(total=len(self.plan.targets), desc="GPTQ", unit="layer",
                      disable=not self.progress) as bar:
                for n, chunk in enumerate(chunks, 1):
                    part = [groups[i] for i in chunk]
                    if source is not None:
                        self._collect(source, chunk, f"Gram matrices {n}/{len(chunks)}")
                    jobs = (self._job(g) for g in part)  # lazily: one Hessian at a time (map)
                    for group, (codes, scales) in zip(part, (self.mapper or map)(run_job, jobs)):
                        self._pack(group, codes, scales)
                        bar.update(len(group.targets))
        finally:
            if source is not None:
                source.close()
                self.plan.gram_source = None
        return ir.passes.PassResult(model, modified=False)

    def _collect(self, source, chunk: list[int], desc: str) -> None:
        t = time.perf_counter()
        grams, tokens = source.grams(chunk, self.plan.groups, desc)
        for i, gram in zip(chunk, grams):
            self.plan.groups[i].gram, self.plan.groups[i].tokens = gram, tokens
        self.gram_seconds += time.perf_counter() - t

    def _job(self, group: InputGroup) -> GPTQJob:
        cfg = self.plan.config
        if group.gram is None or group.s is None or group.perm is None:
            raise SerqError(f"GPTQ for {group.name} needs calibration Gram matrices and the "
                            "flattening scales; run CalibratePass and FoldFlatteningPass first")
        w = np.concatenate([t.residual_f32() for t in group.targets], axis=1)
        bits_w = {t.layer_bits(cfg)[0] for t in group.targets}
        if len(bits_w) != 1:
            raise SerqError(f"{group.name}: layers reading one input must share weight bits")
        return GPTQJob(group.name, w, group.gram, group.tokens, group.s, group.perm,
                       bits_w.pop(), cfg.group_w, cfg.gptq_damp, cfg.weight_scale == "mse")

    def _pack(self, group: InputGroup, codes: np.ndarray, scales: np.ndarray) -> None:
        cfg = self.plan.config
        start = 0
        for t in group.targets:
            cols = slice(start, start + t.N)
            start += t.N
            pack_target(t, cfg, np.ascontiguousarray(codes[:, cols]),
                        np.ascontiguousarray(scales[:, cols]), self.plan.packed_store)
        group.gram = None  # K x K per group: free it as soon as it is used
