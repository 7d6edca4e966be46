"""Move every target weight into flattened, saliency-ordered form: ``W^ = (diag(s) W)[pi]``.

Together with the producer-side fold this leaves ``X W = X^ W^`` exactly (in real arithmetic).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx.errors import SerqError
from serq_onnx.plan import initializer_array, set_initializer

from ._base import PlanPass


class PermuteWeightsPass(PlanPass):
    def requires(self, model: ir.Model) -> None:
        """Flattening scales and order chosen and folded (FoldFlatteningPass)."""
        if self.plan.config.flattens:
            self.require_flattening()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.plan.config.flattens:
            return ir.passes.PassResult(model, modified=False)
        for group in self.plan.groups:
            for t in group.targets:
                if len(t.weight.uses()) != 1:
                    raise SerqError(f"{t.name}: its weight is shared with other nodes; "
                                    "serq-onnx needs one weight per linear layer")
                w = initializer_array(t.weight).astype(np.float32)
                t.w_hat = np.ascontiguousarray((group.s[:, None] * w)[group.perm])
                set_initializer(model.graph, t.weight, t.w_hat)
        return ir.passes.PassResult(model, modified=True)
