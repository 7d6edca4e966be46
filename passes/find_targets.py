"""Find the decoder's linear layers and group them by the activation they read.

Matching is structural (a ``MatMul`` whose second input is a 2-D float initializer), so it does
not depend on exporter naming; names only label the targets. ``lm_head`` (the MatMul producing the
``logits`` output) is left in float unless ``config.lm_head`` asks for it; embeddings and
attention always are.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from serq_onnx.errors import SerqError
from serq_onnx.plan import LM_HEAD_BITS, InputGroup, Target

from ._base import PlanPass

# qkv: genai's builder packs the query, key and value projections into one MatMul.
_ROLE = re.compile(r"(qkv|q|k|v|o|gate|up|down)_proj")
_LAYER = re.compile(r"layers[./](\d+)")
# Fused RMSNorms and the input that holds gamma: SkipSimplifiedLayerNormalization takes
# (input, skip, gamma[, bias]); only its output 0 is the normalized value.
_NORM_GAMMA = {"SimplifiedLayerNormalization": 1, "RMSNormalization": 1,
               "SkipSimplifiedLayerNormalization": 2}
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_SUPPORTED = {ir.DataType.FLOAT, ir.DataType.FLOAT16}  # SerqMatMul's A: float32 or float16


def _is_weight(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None
            and len(value.const_value.shape) == 2 and value.const_value.dtype in _FLOAT)


def _label(node: ir.Node, index: int) -> tuple[str, str, int]:
    name = node.name or ""
    role_m, layer_m = _ROLE.search(name), _LAYER.search(name)
    role = role_m.group(1) if role_m else f"linear{index}"
    layer = int(layer_m.group(1)) if layer_m else -1
    attn = ("qkv", "q", "k", "v", "o")
    section = "self_attn" if role in attn else "mlp" if role_m else "linear"
    label = f"layers.{layer}.{section}.{role}_proj" if role_m else (name or f"matmul{index}")
    return label, role, layer


def constant_of(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value``, looking through ``Identity`` (exporters dedupe equal
    initializers that way)."""
    while value is not None and value.const_value is None:
        p = value.producer()
        if p is None or p.op_type != "Identity":
            return None
        value = p.inputs[0]
    return value


def _gamma_index(producer: ir.Node, value: ir.Value, K: int) -> int | None:
    """Index of the 1-D ``[K]`` constant input (RMSNorm's gamma) of the norm's last node."""
    if producer.op_type in _NORM_GAMMA and producer.domain in ("", "ai.onnx", "com.microsoft"):
        i = _NORM_GAMMA[producer.op_type]
        cand = [i] if len(producer.inputs) > i and value is producer.outputs[0] else []
    elif producer.op_type == "Mul":
        cand = range(len(producer.inputs))
    else:
        return None
    for i in cand:
        c = constant_of(producer.inputs[i])
        if c is not None and tuple(c.const_value.shape) == (K,):
            return i
    return None


def _silu_input(value: ir.Value) -> ir.Value | None:
    """``g`` if ``value`` is ``g * Sigmoid(g)``, else None."""
    p = value.producer()
    if p is None or p.op_type != "Mul" or len(p.inputs) != 2:
        return None
    a, b = p.inputs
    for x, y in ((a, b), (b, a)):
        q = y.producer() if y is not None else None
        if q is not None and q.op_type == "Sigmoid" and q.inputs[0] is x:
            return x
    return None


class FindTargetsPass(PlanPass):
    """Fill ``plan.groups``; raise a clear error if the graph has nothing to convert."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = set(graph.outputs)
        by_input: dict[ir.Value, list[Target]] = {}
        for i, node in enumerate(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            if not _is_weight(node.inputs[1]):
                continue
            head = node.outputs[0] in outputs
            if head and not (self.plan.config.lm_head != "float"
                             and node.outputs[0].name == "logits"):
                continue
            if node.inputs[1].const_value.dtype not in _SUPPORTED:
                raise SerqError(f"{node.name}: {node.inputs[1].const_value.dtype.name} weights "
                                "are not supported; export with float32 (Optimum's default) or "
                                "float16 (--dtype fp16) weights")
            K, N = (int(d) for d in node.inputs[1].const_value.shape)
            label, role, layer = _label(node, i)
            target = Target(node=node, name=label, role=role, layer=layer, K=K, N=N)
            if head:  # the LM head: its own bits, no salient correction
                target.name, target.role = "lm_head", "lm_head"
                target.bits, target.rank_cap = LM_HEAD_BITS[self.plan.config.lm_head], 0
            by_input.setdefault(node.inputs[0], []).append(target)
        if not by_input:
            raise SerqError("no linear layers found: the model has no MatMul with a 2-D float "
                            "weight initializer (is it an Optimum export of a decoder LM?)")
        outputs_of = {t.node.outputs[0]: t for ts in by_input.values() for t in ts}
        groups = []
        for value, targets in by_input.items():
            groups.append(self._group(value, targets, outputs_of))
        self.plan.groups = groups
        return ir.passes.PassResult(model, modified=False)

    @staticmethod
    def _group(value: ir.Value, targets: list[Target], outputs_of: dict) -> InputGroup:
        K = targets[0].K
        producer = value.producer()
        # Shape/Size read only the shape, which flattening and permutation keep.
        consumers = {u.node for u in value.uses() if u.node.op_type not in ("Shape", "Size")}
        only_targets = consumers == {t.node for t in targets}
        if producer is not None and only_targets:
            index = _gamma_index(producer, value, K)
            if index is not None:
                return InputGroup(value=value, kind="norm", targets=targets, gamma_index=index)
            if producer.op_type == "Mul" and len(producer.inputs) == 2:
                a, b = producer.inputs
                for x, y in ((a, b), (b, a)):
                    up, g = outputs_of.get(y), _silu_input(x)
                    gate = outputs_of.get(g) if g is not None else None
                    if up is not None and gate is not None and up.K == gate.K and up.N == K == gate.N:
                        return InputGroup(value=value, kind="mlp_act", targets=targets,
                                          gate=gate, up=up)
        if producer is None:
            why = "the input is a graph input"
        elif not only_targets:
            others = sorted({n.op_type for n in consumers - {t.node for t in targets}})
            why = f"the input also feeds {', '.join(others)}, which must see it unscaled"
        else:
            why = (f"its producer ({producer.op_type}) is neither an RMSNorm with a constant "
                   f"[{K}] gamma nor SiLU(gate) * up")
        return InputGroup(value=value, kind="runtime", targets=targets, runtime_reason=why)
