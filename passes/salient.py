"""SERQ's single-factor salient reconstruction: ``R`` from the first ``r`` rows of ``W^``.

Because the weights are saliency-ordered, the salient channels are the contiguous slice ``:r``;
``R`` (4-bit, one scale per column) and the residual main weight are computed by
``reference.salient_split`` so the op and the converter share one definition.
"""

from __future__ import annotations

import onnx_ir as ir

from serq_onnx import reference
from serq_onnx.plan import initializer_array

from ._base import PlanPass


class SalientReconstructionPass(PlanPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.plan.config
        for t in self.plan.targets:
            rank = min(cfg.effective_rank, t.K)
            t.r_codes, t.r_scale, t.residual = reference.salient_split(
                initializer_array(t.weight), rank, cfg.bits_w)
        return ir.passes.PassResult(model, modified=False)
