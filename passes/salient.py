"""SERQ's single-factor salient reconstruction: ``R`` from the first ``r`` rows of ``W^``.

Because the weights are saliency-ordered, the salient channels are the contiguous slice ``:r``;
``R`` (4-bit, one scale per column) and the residual main weight are computed by
``reference.salient_split`` so the op and the converter share one definition. ``W^`` is
computed when read (PermuteWeightsPass), and so is the residual: only ``R`` is kept, so that no
layer's float weight stays resident until the quantizer reaches it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from serq_onnx import reference

from ._base import PlanPass


class SalientReconstructionPass(PlanPass):
    def requires(self, model: ir.Model) -> None:
        """Scales and order chosen (FoldFlatteningPass); if the method flattens, weights in
        flattened, saliency-ordered form (PermuteWeightsPass)."""
        self.require_flattening()
        if self.plan.config.flattens:
            raw = [t.name for t in self.plan.targets if t.w_hat is None]
            self.precondition(not raw, f"{raw[0] if raw else ''} is not yet in flattened, "
                              "saliency-ordered form; run PermuteWeightsPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.plan.config
        for t in self.plan.targets:
            rank, bits = t.layer_rank(cfg), t.layer_bits(cfg)[0]
            t.r_codes, t.r_scale, _ = reference.salient_split(t.weight_f32(), rank, bits)
            t.residual = _recomputed(t.weight_f32, rank, bits)
        return ir.passes.PassResult(model, modified=False)


def _recomputed(weight: Callable[[], np.ndarray], rank: int, bits: int
                ) -> Callable[[], np.ndarray]:
    """The residual from a fresh ``W^`` (``weight`` returns a new array each call): the same
    ``salient_split`` again, bit-identical since ``W^`` is deterministic, so that only R's
    codes are held between the passes."""
    def residual() -> np.ndarray:
        return reference.salient_split(weight(), rank, bits)[2]
    return residual
