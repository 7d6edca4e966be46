"""Drop what conversion left unused: float weights, absorbed run-time nodes, their constants."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass


class CleanupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = RemoveUnusedNodesPass()(model).modified
        modified = RemoveUnusedOpsetsPass()(model).modified or modified
        graph = model.graph
        used_inputs = set(graph.inputs)
        for name, value in list(graph.initializers.items()):
            if not value.uses() and value not in graph.outputs and value not in used_inputs:
                del graph.initializers[name]
                modified = True
        return ir.passes.PassResult(model, modified=modified)
