"""Move every target weight into flattened, saliency-ordered form: ``W^ = (diag(s) W)[pi]``.

Together with the producer-side fold this leaves ``X W = X^ W^`` exactly (in real arithmetic).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx.errors import SerqError
from serq_onnx.plan import Target, initializer_array, set_initializer

from ._base import PlanPass


def _release(tensor) -> None:
    """Unmap an external tensor's file (it maps again when next read); no-op otherwise."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def set_flattened_lazily(t: Target, s: np.ndarray, perm: np.ndarray) -> None:
    """Make ``t``'s weight ``W^ = (diag(s) W)[perm]`` without holding it: the graph's
    initializer and ``t.w_hat`` compute it from the original (memory-mapped for external
    data) each time they are read -- when the fold check saves the model, when the quantizers
    take it -- so a whole model's flattened float weights are never resident at once."""
    src = t.weight.const_value

    def flattened() -> np.ndarray:
        w = src.numpy().astype(np.float32)
        out = np.ascontiguousarray((s[:, None] * w)[perm])
        _release(src)
        return out

    t.w_hat = flattened
    t.weight.const_value = ir.LazyTensor(lambda: ir.tensor(flattened()), dtype=ir.DataType.FLOAT,
                                         shape=ir.Shape(src.shape), name=t.weight.name)


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
                if t.weight.const_value.dtype == ir.DataType.FLOAT:
                    set_flattened_lazily(t, group.s, group.perm)
                    continue
                # FP16: computed now, so that an overflow of FP16 is reported here.
                w = initializer_array(t.weight).astype(np.float32)
                t.w_hat = np.ascontiguousarray((group.s[:, None] * w)[group.perm])
                set_initializer(model.graph, t.weight, t.w_hat)
        return ir.passes.PassResult(model, modified=True)
