"""Replace each target ``MatMul`` by one ``com.serq::SerqMatMul``.

Run-time transforms left by ``FoldFlatteningPass`` in front of the layer (``Gather`` for the
permutation, ``Mul`` for the scale) are absorbed as the op's ``act_perm``/``act_scale`` inputs, so
the permutation and scaling fuse into activation quantization instead of running as float ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx import packed_store, reference

from ._base import PlanPass
from .fold_flattening import RUNTIME_KEY


def _absorb(graph: ir.Graph, x: ir.Value, kind: str) -> tuple[ir.Value, ir.Value | None]:
    p = x.producer()
    if p is None or p.metadata_props.get(RUNTIME_KEY) != kind:
        return x, None
    const = p.inputs[1]
    if kind == "scale" and const.const_value.dtype != ir.DataType.FLOAT:
        # The op takes act_scale in float32; an FP16 graph carried it in FP16.
        f32 = ir.Value(name=f"{const.name}.f32",
                       const_value=ir.tensor(const.const_value.numpy().astype(np.float32)))
        if f32.name not in graph.initializers:
            graph.register_initializer(f32)
        const = graph.initializers[f32.name]
    return p.inputs[0], const


class ReplaceMatMulPass(PlanPass):
    def requires(self, model: ir.Model) -> None:
        """Every target's weights quantized and packed (QuantizeWeightsPass or GPTQPass), its
        node still a float MatMul."""
        self.require_targets()
        raw = [t.name for t in self.plan.targets if t.weights is None]
        self.precondition(not raw, f"{raw[0] if raw else ''} is not quantized; run "
                          "QuantizeWeightsPass or GPTQPass first")
        done = [t.name for t in self.plan.targets if t.node.op_type != "MatMul"]
        self.precondition(not done, f"{done[0] if done else ''} was already replaced")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        scheme = "int"
        store = self.plan.packed_store
        for t in self.plan.targets:
            x, act_scale = _absorb(graph, t.node.inputs[0], "scale")
            x, act_perm = _absorb(graph, x, "perm")
            w = t.weights
            prefix = t.weight.name or t.name
            inits = []
            for key, arr in w.initializers().items():
                name = f"{prefix}.serq_{key}"
                v = ir.Value(name=name, const_value=packed_store.tensor(store, arr, name))
                graph.register_initializer(v)
                inits.append(v)
            inputs = [x, *inits, act_scale, act_perm]
            while inputs[-1] is None:
                inputs.pop()
            old_out = t.node.outputs[0]
            name = (t.node.name or t.name).replace("MatMul", "SerqMatMul")
            new = ir.node(reference.OP_TYPE, inputs, attributes=w.layout.attributes(scheme),
                          domain=reference.DOMAIN, version=reference.OP_VERSION, name=name,
                          outputs=[ir.Value(shape=old_out.shape, type=old_out.type)])
            graph.insert_before(t.node, new)
            ir.convenience.replace_all_uses_with(old_out, new.outputs[0], replace_graph_outputs=True)
            out_name = old_out.name
            graph.remove(t.node, safe=True)
            new.outputs[0].name = out_name
            t.node = new
        model.opset_imports[reference.DOMAIN] = reference.OP_VERSION
        return ir.passes.PassResult(model, modified=True)
