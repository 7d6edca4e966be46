"""Fuse SerqMatMuls that read the same activation (q/k/v, gate/up) into one, plus a ``Split``.

Siblings share ``s``, ``pi`` and hence the quantized activation: one op quantizes it once and runs
one GEMM over the concatenated columns. Column blocks are independent in the op's semantics, so
the fused op computes exactly what the separate ones did.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx import packed_store, reference

from ._base import PlanPass

_WEIGHT_INPUTS = (1, 2, 3)  # B, scales, wsum: row n holds column n's data


def _key(node: ir.Node) -> tuple:
    attrs = {k: v.value for k, v in node.attributes.items() if k != "N"}
    extra = tuple(id(v) if v is not None else None for v in list(node.inputs)[4:])
    return (id(node.inputs[0]), extra, tuple(sorted(attrs.items())))


class FuseSiblingsPass(PlanPass):
    def requires(self, model: ir.Model) -> None:
        """Every target already a SerqMatMul (ReplaceMatMulPass)."""
        self.require_targets()
        raw = [t.name for t in self.plan.targets if t.node.op_type != reference.OP_TYPE]
        self.precondition(not raw, f"{raw[0] if raw else ''} is still a float MatMul; run "
                          "ReplaceMatMulPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for group in self.plan.groups:
            nodes = [t.node for t in group.targets]
            if len(nodes) < 2 or len({_key(n) for n in nodes}) != 1:
                continue
            if any(len(n.inputs) > 6 for n in nodes):  # a bias would need concatenating too
                continue
            self._fuse(graph, group, nodes, self.plan.packed_store)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _fuse(graph: ir.Graph, group, nodes: list[ir.Node],
              store: packed_store.PackedStore | None = None) -> None:
        sizes = [int(n.attributes["N"].value) for n in nodes]
        prefix = f"{nodes[0].name or group.name}/fused"
        inits = []
        for i in _WEIGHT_INPUTS:
            parts = [n.inputs[i].const_value for n in nodes]
            arr = packed_store.put(store, np.concatenate([p.numpy() for p in parts], axis=0))
            for p in parts:
                if isinstance(p, ir.ExternalTensor):
                    p.release()
            name = f"{prefix}.{['B', 'scales', 'wsum'][i - 1]}"
            v = ir.Value(name=name, const_value=packed_store.tensor(store, arr, name))
            graph.register_initializer(v)
            inits.append(v)
        attrs = {k: v.value for k, v in nodes[0].attributes.items()}
        attrs["N"] = sum(sizes)
        first = nodes[0]
        fused = ir.node(reference.OP_TYPE, [first.inputs[0], *inits, *list(first.inputs)[4:]],
                        attributes=attrs, domain=reference.DOMAIN,
                        version=reference.OP_VERSION, name=prefix,
                        outputs=[ir.Value(name=f"{prefix}/Y")])
        split_sizes = ir.Value(name=f"{prefix}/split",
                               const_value=ir.tensor(np.array(sizes, np.int64)))
        graph.register_initializer(split_sizes)
        outs = [ir.Value(name=f"{prefix}/part{j}", shape=n.outputs[0].shape,
                         type=n.outputs[0].type) for j, n in enumerate(nodes)]
        split = ir.node("Split", [fused.outputs[0], split_sizes], attributes={"axis": -1},
                        name=f"{prefix}/Split", outputs=outs)
        graph.insert_before(first, [fused, split])
        for node, out in zip(nodes, outs):
            old = node.outputs[0]
            name = old.name
            ir.convenience.replace_all_uses_with(old, out)
            graph.remove(node, safe=True)
            out.name = name
        for t, out in zip(group.targets, outs):
            t.node = fused
