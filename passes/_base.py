"""The base of the passes that read and annotate the shared conversion plan."""

from __future__ import annotations

import onnx_ir as ir

from serq_onnx.plan import Plan


class PlanPass(ir.passes.InPlacePass):
    """An in-place ``onnx_ir`` pass with access to the :class:`~serq_onnx.plan.Plan`.

    Subclasses state what they need from earlier passes in ``requires()`` (its docstring's first
    line is what ``serq-onnx inspect`` lists) and check it with :meth:`precondition`, so running
    passes out of order fails at once, naming the pass and what is missing.
    """

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def precondition(self, ok: bool, what: str) -> None:
        """Raise ``PreconditionError`` naming this pass and ``what`` it lacks unless ``ok``."""
        if not ok:
            raise ir.passes.PreconditionError(f"{type(self).__name__}: {what}")

    def require_targets(self) -> None:
        self.precondition(bool(self.plan.groups),
                          "the plan has no target layers; run FindTargetsPass first")

    def require_flattening(self) -> None:
        """Every group has its scales ``s`` and order ``perm`` (FoldFlatteningPass ran)."""
        self.require_targets()
        missing = [g.name for g in self.plan.groups if g.s is None or g.perm is None]
        self.precondition(not missing, f"no flattening scales and order for {missing[0]}; "
                          "run FoldFlatteningPass first" if missing else "")
