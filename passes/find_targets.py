"""Find the decoder's linear layers and group them by the activation they read.

Matching is structural (a ``MatMul`` whose second input is a 2-D float initializer), so it does
not depend on exporter naming; names only label the targets. ``lm_head`` (the MatMul producing the
``logits`` output) is left in float unless ``config.lm_head`` asks for it; embeddings and
attention always are.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from serq_onnx.errors import SerqError
from serq_onnx.plan import LM_HEAD_BITS, InputGroup, Target

from ._base import PlanPass

# Fused projections first: ``qkv_proj`` (Phi-3, genai's builder) would otherwise read as
# ``v_proj``, ``gate_up_proj`` as ``up_proj``.
_ROLE = re.compile(r"(qkv|gate_up|q|k|v|o|gate|up|down)_proj")
_ATTN_ROLES = ("qkv", "q", "k", "v", "o")
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


def _source_name(node: ir.Node) -> str:
    """The name that says which module a node came from: torch.onnx's dynamo exporter names
    nodes ``node_linear_3`` but records the module path (``...layers.0.self_attn.q_proj``) in
    its ``pkg.torch.onnx.name_scopes`` metadata; other exporters name the node itself."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    found = re.findall(r"'([^']*)'", scopes)
    for scope in reversed(found):
        if _ROLE.search(scope) or scope.endswith("lm_head"):
            return scope
    return node.name or ""


def _label(node: ir.Node, index: int) -> tuple[str, str, int]:
    name = _source_name(node)
    role_m, layer_m = _ROLE.search(name), _LAYER.search(name)
    role = role_m.group(1) if role_m else f"linear{index}"
    layer = int(layer_m.group(1)) if layer_m else -1
    section = "self_attn" if role in _ATTN_ROLES else "mlp" if role_m else "linear"
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


# Ops that act on each element alone (their other inputs scalar constants), so they commute
# with a permutation of the channels: what may lie between the gate projection and the product.
_ELEMENTWISE = {"Abs", "Add", "Cast", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid",
                "HardSwish", "Identity", "LeakyRelu", "Mish", "Mul", "Neg", "Pow", "Reciprocal",
                "Relu", "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh",
                "FastGelu", "QuickGelu"}
_MAX_ACT_NODES = 32


def _const_array(value: ir.Value | None):
    """The numpy value of an initializer or ``Constant`` output, else None."""
    c = constant_of(value)
    if c is not None:
        return c.const_value.numpy()
    p = value.producer() if value is not None else None
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


def _is_scalar_const(value: ir.Value | None) -> bool:
    a = _const_array(value)
    return a is not None and a.size == 1


def _static_ints(value: ir.Value | None, last_dims: dict, depth: int = 0):
    """The int64 array ``value`` holds whatever the input, or None: constants and the integer
    arithmetic exporters put on ``Shape`` to cut a fused projection (``Slice`` bounds).
    ``last_dims`` maps values to their known last dimension (a projection's N)."""
    if value is None or depth > 16:
        return None
    a = _const_array(value)
    if a is not None:
        return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else None
    p = value.producer()
    if p is None or p.domain not in ("", "ai.onnx"):
        return None
    ins = [] if p.op_type in ("Shape", "Gather") else [
        _static_ints(x, last_dims, depth + 1) for x in p.inputs]
    if p.op_type == "Gather":  # Shape(x)[-1] is the only dimension known
        src, idx = p.inputs[0].producer(), _static_ints(p.inputs[1], last_dims, depth + 1)
        if (src is not None and src.op_type == "Shape" and idx is not None and idx.size == 1
                and int(idx.reshape(-1)[0]) == -1 and "end" not in src.attributes
                and src.inputs[0] in last_dims):
            return np.full(idx.shape, last_dims[src.inputs[0]], np.int64)
        return None
    if any(x is None for x in ins):
        return None
    if p.op_type in ("Identity", "Cast") and ins:
        return ins[0]
    if p.op_type in ("Add", "Sub", "Mul") and len(ins) == 2:
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[p.op_type](*ins)
    if p.op_type == "Div" and len(ins) == 2 and np.all(ins[1] != 0):
        return np.trunc(ins[0] / ins[1]).astype(np.int64)
    return None


def _is_last_axis(axis: int, value: ir.Value) -> bool:
    """Whether ``axis`` is the last of ``value``: -1, or rank - 1 with the rank from its shape,
    else 3 (a decoder's activations are ``[batch, seq, features]``; the fold and attention
    checks would catch anything else)."""
    rank = len(value.shape) if value.shape is not None else 3
    return axis in (-1, rank - 1)


def column_range(node: ir.Node, N: int, last_dims: dict, out: ir.Value):
    """``(start, end)``: the columns of a ``[.., N]`` value that ``Slice``/``Split`` ``node``
    cuts on the last axis into ``out``; None when not static or not on the last axis."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Slice" and len(node.inputs) >= 4:
        starts, ends, axes = (_static_ints(node.inputs[i], last_dims) for i in (1, 2, 3))
        steps = _static_ints(node.inputs[4], last_dims) if len(node.inputs) > 4 else np.ones(1)
        if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
            return None
        if not _is_last_axis(int(axes.reshape(-1)[0]), node.inputs[0]):
            return None
        if int(steps.reshape(-1)[0]) != 1:
            return None
        lo, hi = (int(v.reshape(-1)[0]) for v in (starts, ends))
        lo, hi = (min(max(v + N if v < 0 else v, 0), N) for v in (lo, hi))
        return (lo, hi) if hi > lo else None
    if node.op_type == "Split":
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if not _is_last_axis(axis, node.inputs[0]):
            return None
        k = list(node.outputs).index(out)
        split = _static_ints(node.inputs[1], last_dims) if len(node.inputs) > 1 else None
        if split is None and "split" in node.attributes:
            split = np.asarray(node.attributes["split"].value, np.int64)
        if split is None:
            parts = len(node.outputs)
            if N % parts:
                return None
            split = np.full(parts, N // parts, np.int64)
        if int(split.sum()) != N:
            return None
        lo = int(split[:k].sum())
        return lo, lo + int(split[k])
    return None


def _linear_part(value: ir.Value | None, outputs_of: dict, K: int):
    """``(target, cols, cut)`` if ``value`` is a target's output (cols None) or ``K`` of its
    columns cut by a ``Slice``/``Split`` node ``cut`` (a fused projection such as Phi-3's
    ``gate_up_proj``), else None."""
    if value is None:
        return None
    t = outputs_of.get(value)
    if t is not None:
        return (t, None, None) if t.N == K else None
    p = value.producer()
    if p is None or p.op_type not in ("Slice", "Split") or p.inputs[0] not in outputs_of:
        return None
    t = outputs_of[p.inputs[0]]
    cols = column_range(p, t.N, {p.inputs[0]: t.N}, value)
    return (t, cols, p) if cols is not None and cols[1] - cols[0] == K else None


def _act_nodes(value: ir.Value, source):
    """``(part, nodes)`` if ``value`` is an elementwise function (scalar constants aside) of
    exactly one value for which ``source`` gives ``part``; ``nodes`` are the ops in between."""
    nodes: list[ir.Node] = []
    root = None
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or v in seen:
            continue
        seen.add(v)
        part = source(v)
        if part is not None:
            if root is not None and root[0] is not v:
                return None
            root = (v, part)
            continue
        if _is_scalar_const(v):
            continue
        p = v.producer()
        if (p is None or p.op_type not in _ELEMENTWISE or len(p.outputs) != 1
                or p.domain not in ("", "ai.onnx", "com.microsoft")
                or len(nodes) >= _MAX_ACT_NODES):
            return None
        if p not in nodes:
            nodes.append(p)
        stack.extend(p.inputs)
    return None if root is None else (root[1], nodes)


def gated_mlp(product: ir.Node, K: int, outputs_of: dict) -> dict | None:
    """The ``InputGroup`` fields of a gated MLP whose product ``act(gate) * up`` is ``product``
    (``K`` channels), or None.

    ``act`` is any chain of elementwise ops (SiLU, tanh-GELU from Mul/Tanh, Gelu, ...); gate and
    up are separate projections or column ranges of one fused projection cut by ``Slice`` or
    ``Split``. Dividing up's columns by ``s`` and permuting gate's and up's the same way is then
    exact: the product is elementwise in the channels.
    """
    if (product.op_type != "Mul" or product.domain not in ("", "ai.onnx")
            or len(product.inputs) != 2):
        return None
    a, b = product.inputs
    for x, y in ((a, b), (b, a)):
        up = _linear_part(y, outputs_of, K)
        if up is None:
            continue
        found = _act_nodes(x, lambda v: _linear_part(v, outputs_of, K))
        if found is None:
            continue
        gate, nodes = found
        if gate[0] is up[0] and (gate[1] is None or up[1] is None
                                 or not (gate[1][1] <= up[1][0] or up[1][1] <= gate[1][0])):
            continue  # one projection: only disjoint column ranges are gate and up
        if gate[0].K != up[0].K:
            continue
        cuts = [c for c in (gate[2], up[2]) if c is not None]
        return dict(gate=gate[0], up=up[0], gate_cols=gate[1], up_cols=up[1],
                    mlp_nodes=list(dict.fromkeys(cuts + nodes)))
    return None


# Ops that are linear layers already quantized, or linears in a form FindTargets does not take.
_OTHER_LINEARS = {"MatMulNBits": "already 4-bit: convert the float export",
                  "MatMulInteger": "already quantized: convert the float export",
                  "QLinearMatMul": "already quantized: convert the float export",
                  "SerqMatMul": "already converted", "Gemm": "not supported: export with MatMul",
                  "FusedMatMul": "not supported: convert before onnxruntime's optimizer"}


def selects(pattern: str | None, target: Target) -> bool:
    """Whether ``--layers`` ``pattern`` (a regular expression searched in the target's label,
    e.g. ``layers.3.mlp.down_proj``, and in its node's name) takes this decoder linear; None
    takes every one."""
    if pattern is None:
        return True
    rx = re.compile(pattern)
    return bool(rx.search(target.name) or rx.search(target.node.name or ""))


def describe_unrecognised(graph: ir.Graph) -> str:
    """What in ``graph`` looks like a linear layer but is not one FindTargets takes, by kind."""
    seen: dict[str, int] = {}
    for node in graph:
        what = None
        if node.op_type in _OTHER_LINEARS:
            what = f"{node.op_type} ({_OTHER_LINEARS[node.op_type]})"
        elif node.op_type == "MatMul" and not _is_weight(node.inputs[1]):
            w = node.inputs[1]
            c = w.const_value if w is not None else None
            p = w.producer() if w is not None else None
            if c is not None:
                what = f"MatMul with a {len(c.shape)}-D {c.dtype.name} constant weight"
            elif p is not None and p.op_type == "DequantizeLinear":
                what = "MatMul with a DequantizeLinear weight (already quantized)"
            elif (p is not None and p.op_type in ("Transpose", "Cast")
                  and constant_of(p.inputs[0]) is not None):
                what = f"MatMul whose weight is a {p.op_type} of an initializer"
        if what:
            seen[what] = seen.get(what, 0) + 1
    return "; ".join(f"{n} x {w}" for w, n in sorted(seen.items(), key=lambda kv: -kv[1]))


def check_found(graph: ir.Graph, by_input: dict, plan) -> None:
    """Raise a SerqError naming what was not recognised when no decoder linear was taken."""
    decoder = [t for ts in by_input.values() for t in ts if t.role != "lm_head"]
    if decoder:
        return
    pattern = plan.config.layers
    if pattern is not None and plan.left_float:
        names = plan.left_float
        raise SerqError(f"--layers {pattern!r} matches none of the {len(names)} linear layers "
                        f"(labels: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); "
                        "give a regular expression that matches some of them")
    seen = describe_unrecognised(graph)
    what = ("no linear layers found" if not by_input else
            "no decoder linear layers found (only the LM head)")
    raise SerqError(f"{what}: the model has no MatMul with a 2-D float weight initializer "
                    f"feeding the decoder" + (f"; not recognised: {seen}" if seen else "")
                    + " (is it an Optimum export of a decoder LM?)")


class FindTargetsPass(PlanPass):
    """Fill ``plan.groups``; raise a clear error if the graph has nothing to convert."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = set(graph.outputs)
        by_input: dict[ir.Value, list[Target]] = {}
        unselected: dict[ir.Value, Target] = {}
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
            elif not selects(self.plan.config.layers, target):
                self.plan.left_float.append(target.name)
                unselected[node.outputs[0]] = target  # stays float; its weight may take a fold
                continue
            by_input.setdefault(node.inputs[0], []).append(target)
        check_found(graph, by_input, self.plan)
        outputs_of = {t.node.outputs[0]: t for ts in by_input.values() for t in ts}
        outputs_of.update(unselected)
        groups = []
        for value, targets in by_input.items():
            groups.append(self._group(value, targets, outputs_of))
        self.plan.groups = groups
        self.plan.half_precision = any(t.weight.const_value.dtype == ir.DataType.FLOAT16
                                       for t in self.plan.targets)
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
            mlp = gated_mlp(producer, K, outputs_of)
            if mlp is not None:
                return InputGroup(value=value, kind="mlp_act", targets=targets, **mlp)
        if producer is None:
            why = "the input is a graph input"
        elif not only_targets:
            others = sorted({n.op_type for n in consumers - {t.node for t in targets}})
            why = f"the input also feeds {', '.join(others)}, which must see it unscaled"
        else:
            why = (f"its producer ({producer.op_type}) is neither an RMSNorm with a constant "
                   f"[{K}] gamma nor act(gate) * up")
        return InputGroup(value=value, kind="runtime", targets=targets, runtime_reason=why)
