"""Where to cut the float graph between the passes that collect GPTQ's Gram matrices chunk by
chunk (``serq_onnx.gram_chunks``), so that each pass starts where the previous one stopped.

Pass ``c`` needs the nodes above its chunk's group inputs. Those that an earlier pass already
ran are not run again: pass ``c`` is fed the tensors it reads from them (``inputs[c]``: the
residual stream, the rotary tables, the attention mask, ...), which pass ``c - 1`` handed on as
extra outputs (``carry[c - 1]``, the same names); a tensor that a later pass needs but pass ``c``
does not make is handed on through it. The forward passes of all chunks together then run each
node once, instead of once per chunk above it.

The nodes run on the same float inputs as in the uncut graph, so every statistic is the same
(``tests/test_gptq_chunks.py`` checks the model bit for bit). Two kinds of graph are not cut
(:func:`plan_cuts` returns None, and each pass runs from the token ids): graphs with control
flow (nodes holding subgraphs, which may read outer values unseen here), and FP16 / BF16 ones,
whose cut passes were measured off (the tiny FP16 Llama's Gram matrices by up to 5e-4 of their
largest entry). The likely cause: onnxruntime's CPU provider runs most half-precision nodes in
float32 through casts it inserts, so the uncut graph need not round a tensor that a cut graph
is fed rounded to half precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# Name suffix of the outputs that hand a tensor on to the next pass (an Identity of it: a tensor
# may be a graph input of the pass that hands it on).
CARRY_SUFFIX = "/serq_carry"


@dataclass
class CutPlan:
    """Per pass ``c`` (one per chunk): ``inputs[c]``, the tensors it is fed (none for pass 0,
    fed the export's own inputs), and ``carry[c]``, those it hands on (``inputs[c + 1]``)."""

    inputs: list[list[str]]

    @property
    def carry(self) -> list[list[str]]:
        return self.inputs[1:] + [[]]


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """The graph's inputs and node outputs by name."""
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for n in graph for v in n.outputs)
    return values


_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _has_half(graph: ir.Graph) -> bool:
    return any(v.dtype in _HALF for v in [*graph.inputs, *graph.initializers.values()])


def _has_subgraphs(graph: ir.Graph) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in graph for a in node.attributes.values())


def _ancestors(values: Sequence[ir.Value], index: dict[ir.Node, int]) -> set[int]:
    """Indices of the nodes ``values`` are computed from (their producers included)."""
    seen: set[int] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or index[node] in seen:
            continue
        seen.add(index[node])
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def plan_cuts(model: ir.Model, chunk_values: Sequence[Sequence[str]]) -> CutPlan | None:
    """The cut plan for passes collecting statistics of the values ``chunk_values[c]`` (value
    names, per chunk in order), or None where the graph is not cut (control flow, half
    precision)."""
    graph = model.graph
    if _has_subgraphs(graph) or _has_half(graph):
        return None
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    values = values_by_name(graph)
    inits = set(graph.initializers)

    def fed(v: ir.Value | None, done: set[int]) -> bool:
        """Whether a pass that runs after the nodes ``done`` must be fed ``v``."""
        if v is None or v.name in inits:
            return False
        producer = v.producer()
        return producer is None or index[producer] in done

    done: set[int] = set()
    reads: list[set[str]] = []     # per pass: what it reads from earlier passes or the inputs
    produced: list[set[str]] = []  # per pass: what its own nodes compute
    for names in chunk_values:
        wanted = [values[n] for n in names]
        run = _ancestors(wanted, index) - done
        reads.append({v.name for i in run for v in nodes[i].inputs if fed(v, done)} |
                     {v.name for v in wanted if fed(v, done)})
        produced.append({v.name for i in run for v in nodes[i].outputs})
        done |= run
    n = len(chunk_values)
    inputs: list[set[str]] = [set() for _ in range(n)]
    for c in range(n - 1, 0, -1):  # what pass c must be fed: what it reads, and passes on
        inputs[c] = reads[c] | (inputs[c + 1] - produced[c] if c + 1 < n else set())
    order = {v: i for i, v in enumerate(values)}  # graph order: the same names every time
    ordered = [sorted(s, key=order.__getitem__) for s in inputs]
    return CutPlan(inputs=ordered)


def add_carry_outputs(graph: ir.Graph, names: Sequence[str]) -> list[ir.Value]:
    """Outputs ``<name>/serq_carry`` (Identity) handing each tensor ``names`` on; returned in
    order, for the caller to make graph outputs."""
    values = values_by_name(graph)
    outs = []
    for name in names:
        node = ir.Node("", "Identity", [values[name]], name=f"{name}{CARRY_SUFFIX}",
                       outputs=[ir.Value(name=f"{name}{CARRY_SUFFIX}")])
        graph.append(node)
        outs.append(node.outputs[0])
    return outs


def feed_from_cut(graph: ir.Graph, feeds: dict[str, np.ndarray]) -> None:
    """Make the tensors named in ``feeds`` the graph's only inputs (typed as those arrays),
    instead of the values the earlier nodes compute; those nodes are left unused, for
    ``RemoveUnusedNodesPass`` to drop."""
    values = values_by_name(graph)
    new_inputs = []
    for name, arr in feeds.items():
        old = values[name]
        old.name = f"{name}/serq_cut"  # the input takes its name
        new = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                       shape=old.shape)
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new_inputs.append(new)
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
