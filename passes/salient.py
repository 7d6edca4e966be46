"""SERQ's single-factor salient reconstruction: ``R`` from the first ``r`` rows of ``W^``.

Because the weights are saliency-ordered, the salient channels are the contiguous slice ``:r``;
``R`` (4-bit, one scale per column) and the residual main weight are computed by
``reference.salient_split`` so the op and the converter share one definition.
"""

from __future__ import annotations

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
            t.r_codes, t.r_scale, t.residual = reference.salient_split(
                t.weight_f32(), t.layer_rank(cfg), t.layer_bits(cfg)[0])
            t.w_hat = None
        return ir.passes.PassResult(model, modified=False)
