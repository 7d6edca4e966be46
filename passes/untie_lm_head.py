"""Give a tied LM head its own weight, so that it can be quantized apart from the embedding.

Exports of models with tied embeddings (SmolLM2, Llama 3.2, Qwen2.5) compute the head as
``MatMul(h, Transpose(embed_tokens))``: the weight is no initializer, so no pass can quantize it.
This pass materializes the transposed embedding as the head's own ``[K, V]`` initializer; the
embedding lookup keeps the float table. Run it before ``FindTargetsPass`` when the head is to
be quantized; it changes nothing when the head already has an initializer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .find_targets import constant_of


def _transposed_constant(value: ir.Value) -> ir.Value | None:
    """The 2-D constant ``c`` if ``value`` is ``Transpose(c)`` (perm [1, 0] or default)."""
    p = value.producer()
    if p is None or p.op_type != "Transpose" or p.domain not in ("", "ai.onnx"):
        return None
    perm = p.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    c = constant_of(p.inputs[0])
    if c is None or len(c.const_value.shape) != 2:
        return None
    return c


def _copy_shared_weight(graph: ir.Graph, head: ir.Node) -> bool:
    """genai's builder ties the other way round: the head reads the ``[K, V]`` initializer and
    the embedding ``Gather`` its ``Transpose``. The head gets a copy; True if one was made."""
    weight = head.inputs[1]
    if len(weight.uses()) < 2 or len(weight.const_value.shape) != 2:
        return False
    own = ir.Value(name=f"{weight.name}.lm_head",
                   const_value=ir.tensor(np.array(weight.const_value.numpy())))
    graph.register_initializer(own)
    head.replace_input_with(1, own)
    return True


class UntieLMHeadPass(ir.passes.InPlacePass):
    """The MatMul producing ``logits`` gets its weight as an initializer of its own."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        head = next((o.producer() for o in graph.outputs if o.name == "logits"), None)
        if head is None or head.op_type != "MatMul":
            return ir.passes.PassResult(model, modified=False)
        if head.inputs[1].const_value is not None:
            return ir.passes.PassResult(model, modified=_copy_shared_weight(graph, head))
        table = _transposed_constant(head.inputs[1])
        if table is None:
            return ir.passes.PassResult(model, modified=False)
        weight = ir.Value(name=f"{table.name}.lm_head",
                          const_value=ir.tensor(np.ascontiguousarray(table.const_value.numpy().T)))
        graph.register_initializer(weight)
        head.replace_input_with(1, weight)
        return ir.passes.PassResult(model, modified=True)
