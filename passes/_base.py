"""The base of the passes that read and annotate the shared conversion plan."""

from __future__ import annotations

import onnx_ir as ir

from serq_onnx.plan import Plan


class PlanPass(ir.passes.InPlacePass):
    """An in-place ``onnx_ir`` pass with access to the :class:`~serq_onnx.plan.Plan`."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
