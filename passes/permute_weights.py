"""Move every target weight into flattened, saliency-ordered form: ``W^ = (diag(s) W)[pi]``.

Together with the producer-side fold this leaves ``X W = X^ W^`` exactly (in real arithmetic).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx.errors import SerqError
from serq_onnx.plan import Target, cast_checked

from ._base import PlanPass


def _release(tensor) -> None:
    """Unmap an external tensor's file (it maps again when next read); no-op otherwise."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def set_flattened_lazily(t: Target, s: np.ndarray, perm: np.ndarray) -> None:
    """Make ``t``'s weight ``W^ = (diag(s) W)[pi]`` without holding it: the graph's
    initializer (in the graph's dtype) and ``t.w_hat`` (float32) compute it from the original
    (memory-mapped for external data) each time they are read -- when the fold check saves
    the model, when the quantizers take it -- so a whole model's flattened float weights are
    never resident at once. Computed once here where the graph is not float32, so that an
    overflow of its dtype is reported now rather than midway through the fold check."""
    src = t.weight.const_value
    dtype = src.dtype.numpy()

    def flattened() -> np.ndarray:
        w = src.numpy().astype(np.float32)
        out = np.ascontiguousarray((s[:, None] * w)[perm])
        _release(src)
        return out

    def stored() -> ir.TensorProtocol:
        return ir.tensor(cast_checked(flattened(), dtype, t.weight.name))

    if dtype != np.float32:
        stored()
    t.w_hat = flattened
    t.weight.const_value = ir.LazyTensor(stored, dtype=src.dtype, shape=ir.Shape(src.shape),
                                         name=t.weight.name)


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
                set_flattened_lazily(t, group.s, group.perm)
        return ir.passes.PassResult(model, modified=True)
