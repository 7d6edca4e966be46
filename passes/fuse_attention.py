"""Fuse each decoder layer's attention into onnxruntime's ``GroupQueryAttention``.

Optimum's exports spell attention out: rotary embedding, KV-cache concatenation, head repetition,
masking and softmax take about 200 nodes per layer, most of a decode step's time on a CPU once
the linear layers are quantized. onnxruntime's ``com.microsoft::GroupQueryAttention`` does all
of it in one kernel (rotary from cos/sin caches, the cache append, causal attention over grouped
KV heads), and its transformer optimizer does not produce it from these graphs.

The pass finds each layer by structure, not by names: the graph output ``present.N.key`` (and
``.value``) is a ``Concat`` of ``past_key_values.N.key`` with the new key along the sequence
axis; walking back from the new value and key, and from the attention MatMul that reads the
value, leads to the three projections (a ``Reshape`` of a MatMul with a constant weight, of
its bias ``Add``, or of a ``Slice`` of a fused qkv projection; a per-head RMSNorm after the
Reshape, as Qwen3 has, stays and is flattened back for the kernel), and forward to the
``Transpose``/``Reshape`` that feeds the output projection. The query and key projections then
pass through ``RotaryEmbedding`` (the graph's own ``position_ids``) into one
``GroupQueryAttention`` node per layer, whose output feeds the output projection and whose
present key/value become the graph's ``present`` outputs; the old nodes fall away as dead code.
Padded keys are masked with an attention bias built from ``attention_mask``, as transformers
masks them, so left-padded batches stay exact.

The rotary caches come from the model's ``config.json`` (``rope_theta``, head size,
``max_position_embeddings``; only unscaled RoPE). Callers check the fused graph numerically
against the original, prefill and decode, before using it
(:func:`serq_onnx.verify.check_attention_fusion`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from serq_onnx.evaluate import SHARE_BUFFER_KEY

from .find_targets import column_range, constant_of

_STD = ("", "ai.onnx")
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclass(frozen=True)
class RotaryParams:
    """RoPE of the model: ``theta``, the rotated head size and the longest position."""

    theta: float
    head_dim: int
    max_positions: int

    @classmethod
    def from_config(cls, config: dict) -> "RotaryParams":
        """From a Hugging Face ``config.json``; raises ValueError for what the caches cannot
        express (scaled or partial RoPE)."""
        scaling = config.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling.get('rope_type', scaling.get('type'))!r}")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embedding")
        # Sliding-window attention differs from the kernel's full causal attention only past the
        # window, where a short check cannot see it: refused outright.
        window = config.get("sliding_window")
        if window and config.get("use_sliding_window") is not False:
            raise ValueError(f"sliding-window attention ({window} tokens)")
        for key in ("attn_logit_softcapping", "query_pre_attn_scalar"):
            if config.get(key):
                raise ValueError(f"{key} = {config[key]}")
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        return cls(theta=float(config.get("rope_theta", 10000.0)), head_dim=head_dim,
                   max_positions=int(config.get("max_position_embeddings", 2048)))

    def caches(self, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        """``cos, sin`` of shape ``[max_positions, head_dim / 2]``, computed as transformers
        does (float32 inverse frequencies)."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.int64)
                                    .astype(np.float32) / self.head_dim))
        freqs = np.outer(np.arange(self.max_positions, dtype=np.float32), inv.astype(np.float32))
        return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)


@dataclass
class LayerAttention:
    """The anchors of one layer's attention."""

    index: int
    q: ir.Value  # projections, [batch, seq, heads * head_dim] before the head Reshape
    k: ir.Value
    v: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    output: ir.Value  # [batch, seq, hidden]: what the output projection reads


def _is_projection(value: ir.Value) -> bool:
    """``value`` is a MatMul with a constant weight, or that plus a constant bias, or a
    ``Slice`` of those (a fused qkv projection: Phi-3's ``qkv_proj``)."""
    p = value.producer()
    if p is None or p.domain not in _STD:
        return False
    if p.op_type == "Slice":
        return _is_projection(p.inputs[0])
    if p.op_type == "Add":
        return any(constant_of(x) is not None for x in p.inputs) and any(
            x.producer() is not None and _is_projection(x) for x in p.inputs)
    return p.op_type == "MatMul" and constant_of(p.inputs[1]) is not None


def _head_reshapes(start: ir.Value, limit: int = 400) -> list[ir.Value]:
    """Projections found walking back from ``start``: inputs of a ``Reshape`` that is read by a
    ``Transpose`` (the split into heads). The walk stops at projections and graph inputs."""
    found, seen, stack = [], set(), [start]
    while stack and len(seen) < limit:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Reshape" and node.domain in _STD and _is_projection(node.inputs[0]):
            if any(u.op_type == "Transpose" for u, _ in node.outputs[0].uses()):
                if node.inputs[0] not in found:
                    found.append(node.inputs[0])
                continue
        if node.op_type == "MatMul" and constant_of(node.inputs[1]) is not None:
            continue
        if node.op_type == "Transpose" and _normed_heads(node.inputs[0]) is not None:
            if node.inputs[0] not in found:
                found.append(node.inputs[0])
            continue
        stack.extend(x for x in node.inputs if x is not None)
    return found


# What a per-head RMSNorm (Qwen3's q_norm / k_norm) is exported as, between the head Reshape
# and the Transpose.
_HEAD_NORM_OPS = {"Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Reciprocal",
                  "SimplifiedLayerNormalization", "RMSNormalization"}


def _normed_heads(value: ir.Value, limit: int = 32) -> ir.Node | None:
    """The head ``Reshape`` of a projection that ``value`` normalises per head (``[batch, seq,
    heads, head_dim]``, before the Transpose; Qwen3's q/k norms), or None. Which axis the norm
    reduces is left to the numerical check of the fused graph."""
    reshape, stack, seen = None, [value], set()
    while stack:
        v = stack.pop()
        if v is None or v in seen or constant_of(v) is not None:
            continue
        seen.add(v)
        p = v.producer()
        if p is None or len(seen) > limit or p.domain not in _STD:
            return None
        if p.op_type == "Constant":
            continue
        if p.op_type == "Reshape" and _is_projection(p.inputs[0]):
            if reshape not in (None, p):
                return None
            reshape = p
            continue
        if p.op_type not in _HEAD_NORM_OPS:
            return None
        stack.extend(p.inputs)
    return reshape if reshape is not None and reshape.outputs[0] is not value else None


def _projection_width(value: ir.Value) -> int | None:
    """Columns of a projection (:func:`_is_projection`, or normalised per head); a Slice's
    when they are static."""
    if not _is_projection(value):
        return _projection_width(_normed_heads(value).inputs[0])
    p = value.producer()
    if p.op_type == "Slice":
        n = _projection_width(p.inputs[0])
        cols = None if n is None else column_range(p, n, {p.inputs[0]: n}, value)
        return None if cols is None else cols[1] - cols[0]
    if p.op_type != "MatMul":  # bias Add: the input that is a MatMul projection
        p = next(x.producer() for x in p.inputs
                 if x.producer() is not None and x.producer().op_type == "MatMul")
    return int(constant_of(p.inputs[1]).const_value.shape[1])


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = [u for u, _ in value.uses() if u.op_type == op_type and u.domain in _STD]
    return uses[0] if len(uses) == 1 else None


def _attention_output(present_value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """The probabilities-times-values MatMul reached from the cache's value (through the
    head repetition), and the value its Transpose/Reshape hands to the output projection."""
    frontier, seen = [present_value], set()
    while frontier:
        value = frontier.pop()
        for node, _ in value.uses():
            if id(node) in seen or node.domain not in _STD:
                continue
            seen.add(id(node))
            if node.op_type == "MatMul" and node.inputs[1] is value:
                t = _only_consumer(node.outputs[0], "Transpose")
                r = _only_consumer(t.outputs[0], "Reshape") if t else None
                if r is None:
                    return None
                return node, r.outputs[0]
            # Cast: FP16 exports compute the probabilities and their product in float32.
            if node.op_type in ("Unsqueeze", "Expand", "Reshape", "Identity", "Cast"):
                frontier.append(node.outputs[0])
    return None


def _cache_concat(present: ir.Value, past: ir.Value) -> ir.Value | None:
    """The new entries of ``present = Concat(past, new)`` along the sequence axis."""
    p = present.producer()
    if p is None or p.op_type != "Concat" or p.domain not in _STD or len(p.inputs) != 2:
        return None
    axis = p.attributes.get("axis")
    if axis is None or axis.as_int() not in (2, -2) or p.inputs[0] is not past:
        return None
    return p.inputs[1]


def find_layers(graph: ir.Graph) -> tuple[list[LayerAttention], str | None]:
    """Every layer's anchors, or ``([], reason)`` naming what was not recognised."""
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    for name in ("attention_mask", "position_ids"):
        if name not in inputs:
            return [], f"the graph has no {name!r} input"
    layers = []
    i = 0
    while f"present.{i}.key" in outputs:
        pk, pv = inputs.get(f"past_key_values.{i}.key"), inputs.get(f"past_key_values.{i}.value")
        ok, ov = outputs[f"present.{i}.key"], outputs.get(f"present.{i}.value")
        if pk is None or pv is None or ov is None:
            return [], f"layer {i}: past_key_values.{i}.key/value or present.{i}.value is missing"
        new_k, new_v = _cache_concat(ok, pk), _cache_concat(ov, pv)
        if new_k is None or new_v is None:
            return [], (f"layer {i}: present.{i}.key/value is not Concat(past, new) along the "
                        "sequence axis")
        vs, ks = _head_reshapes(new_v), _head_reshapes(new_k)
        att = _attention_output(ov)
        if len(vs) != 1 or len(ks) != 1 or att is None:
            return [], f"layer {i}: the key/value projections or the attention output were not found"
        scores_in = att[0].inputs[0]
        qs = [q for q in _head_reshapes(scores_in) if q is not ks[0] and q is not vs[0]]
        if len(qs) != 1:
            return [], f"layer {i}: the query projection was not found"
        if not any(u.op_type == "MatMul" and constant_of(u.inputs[1]) is not None
                   for u, _ in att[1].uses()):
            return [], f"layer {i}: the attention output does not feed a projection"
        layers.append(LayerAttention(i, qs[0], ks[0], vs[0], pk, pv, ok, ov, att[1]))
        i += 1
    if not layers:
        return [], "the graph has no present.N.key outputs (export with a KV cache: " \
                   "--task text-generation-with-past)"
    return layers, None


_FUSED = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


def already_fused(graph: ir.Graph) -> str | None:
    """Why there is nothing to fuse when the exporter already did (genai's model builder writes
    ``GroupQueryAttention`` with rotary inside), else None."""
    found: dict[str, int] = {}
    for node in graph:
        if node.op_type in _FUSED and node.domain == "com.microsoft":
            found[node.op_type] = found.get(node.op_type, 0) + 1
    if not found:
        return None
    what = ", ".join(f"{n} {op}" for op, n in sorted(found.items()))
    return f"already fused by the exporter: {what} nodes"


def _static_dims(value: ir.Value) -> list[int | None]:
    shape = value.shape
    return [] if shape is None else [d if isinstance(d, int) else None for d in shape.dims]


class FuseAttentionPass(ir.passes.InPlacePass):
    """Replace every layer's attention by one ``GroupQueryAttention``; ``reason`` says why not
    when the graph was left unchanged."""

    def __init__(self, rotary: RotaryParams):
        super().__init__()
        self.rotary = rotary
        self.reason: str | None = None
        self.layers = 0
        self.dtype: ir.DataType | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.reason = already_fused(graph)
        if self.reason:
            return ir.passes.PassResult(model, modified=False)
        layers, self.reason = find_layers(graph)
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        dims = _static_dims(layers[0].past_key)
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            self.reason = "past_key_values have no static [batch, kv_heads, seq, head_dim] shape"
            return ir.passes.PassResult(model, modified=False)
        kv_heads, head_dim = dims[1], dims[3]
        if head_dim != self.rotary.head_dim:
            self.reason = f"head size {head_dim} differs from the config's {self.rotary.head_dim}"
            return ir.passes.PassResult(model, modified=False)
        dtype = self.dtype = layers[0].past_key.dtype
        if dtype not in _FLOATS:
            self.reason = f"{dtype} KV cache"
            return ir.passes.PassResult(model, modified=False)
        heads = []
        for layer in layers:
            width = _projection_width(layer.q)
            if width is None:
                self.reason = f"layer {layer.index}: the query's columns of qkv are not static"
                return ir.passes.PassResult(model, modified=False)
            if width % head_dim:
                self.reason = f"layer {layer.index}: query width {width} is not a multiple of {head_dim}"
                return ir.passes.PassResult(model, modified=False)
            heads.append(width // head_dim)

        cos, sin = self.rotary.caches(_FLOATS[dtype])
        cos_v = ir.Value(name="serq.rotary.cos_cache", const_value=ir.tensor(cos))
        sin_v = ir.Value(name="serq.rotary.sin_cache", const_value=ir.tensor(sin))
        graph.register_initializer(cos_v)
        graph.register_initializer(sin_v)
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
        positions = next(v for v in graph.inputs if v.name == "position_ids")
        seqlens, total, bias = _mask_inputs(graph, mask, positions, dtype)
        flat_shape = ir.Value(name="serq.gqa.flat_heads", const_value=ir.tensor(
            np.array([0, 0, -1], np.int64)))
        graph.register_initializer(flat_shape)

        for layer, n_heads in zip(layers, heads):
            prefix = f"/model/layers.{layer.index}/self_attn"
            rotated = []
            for x, h, tag in ((layer.q, n_heads, "q"), (layer.k, kv_heads, "k")):
                if not _is_projection(x):  # normalised per head: back to [batch, seq, hidden]
                    flat = ir.node("Reshape", [x, flat_shape], name=f"{prefix}/{tag}_norm_flat")
                    graph.append(flat)
                    x = flat.outputs[0]
                rot = ir.node("RotaryEmbedding", [x, positions, cos_v, sin_v],
                              attributes={"interleaved": 0, "num_heads": h},
                              domain="com.microsoft", name=f"{prefix}/RotaryEmbedding_{tag}")
                graph.append(rot)
                rotated.append(rot.outputs[0])
            node = ir.node(
                "GroupQueryAttention",
                [rotated[0], rotated[1], layer.v, layer.past_key, layer.past_value, seqlens, total,
                 None, None, None, bias],
                attributes={"num_heads": n_heads, "kv_num_heads": kv_heads, "do_rotary": 0},
                domain="com.microsoft", num_outputs=3, name=f"{prefix}/GroupQueryAttention")
            graph.append(node)
            out, pk, pv = node.outputs
            out.name = f"{prefix}/GroupQueryAttention_output_0"
            # The output projection's weight says which type it reads (FP16 exports hand it a
            # float32 attention output); the kernel's output is in the cache's type.
            proj = next(u for u, _ in layer.output.uses() if u.op_type == "MatMul"
                        and constant_of(u.inputs[1]) is not None)
            want = constant_of(proj.inputs[1]).const_value.dtype
            if want != dtype:
                cast = ir.node("Cast", [out], attributes={"to": want},
                               name=f"{prefix}/GroupQueryAttention_output_cast")
                graph.append(cast)
                cast.outputs[0].name = f"{prefix}/GroupQueryAttention_output_cast_0"
                out = cast.outputs[0]
            layer.output.replace_all_uses_with(out)
            for old, new in ((layer.present_key, pk), (layer.present_value, pv)):
                name = old.name
                idx = graph.outputs.index(old)
                old.name = f"{name}.unfused"
                new.name = name
                new.dtype, new.shape = old.dtype, old.shape
                graph.outputs[idx] = new
        RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        model.opset_imports.setdefault("com.microsoft", 1)
        # Only GroupQueryAttention reads the cache now, so a caller may bind one preallocated
        # [batch, kv_heads, max_length, head_dim] buffer as both past and present: the kernel
        # then writes only the new positions instead of copying the whole cache every step.
        model.metadata_props[SHARE_BUFFER_KEY] = "1"
        self.layers = len(layers)
        return ir.passes.PassResult(model, modified=True)


def _mask_inputs(graph: ir.Graph, mask: ir.Value, positions: ir.Value,
                 dtype: ir.DataType) -> tuple[ir.Value, ir.Value, ir.Value]:
    """What GroupQueryAttention needs besides the projections and the cache, from the graph's
    ``attention_mask [batch, total]`` and ``position_ids [batch, seq]``:

    * ``seqlens_k = total - 1`` for every row and ``total_sequence_length = total``: every key
      position counts, so left padding (Optimum's and transformers' batching) keeps each row's
      keys where they are;
    * ``attention_bias [batch, 1, seq, total]``: the dtype's lowest value where the mask is 0, as
      transformers masks padded keys; the causal part is the kernel's own.

    Rotary runs before the kernel (RotaryEmbedding with the graph's ``position_ids``), so
    positions are the model's own, padding or not.
    """
    def const(name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, const_value=ir.tensor(array))
        graph.register_initializer(v)
        return v

    def op(op_type: str, inputs: list, name: str, **attrs) -> ir.Value:
        n = ir.node(op_type, inputs, attributes=attrs, name=f"/serq/attention_inputs/{name}")
        graph.append(n)
        n.outputs[0].name = f"serq.attention_inputs.{name}"
        return n.outputs[0]

    np_dtype = _FLOATS[dtype]
    i0, i1 = const("serq.gqa.i0", np.array([0], np.int64)), const("serq.gqa.i1", np.array([1], np.int64))
    i2 = const("serq.gqa.i2", np.array([2], np.int64))
    one = const("serq.gqa.one", np.array(1, np.int64))
    axis1 = const("serq.gqa.scalar1", np.array(1, np.int64))
    lowest = const("serq.gqa.lowest", np.array(np.finfo(np_dtype).min, np_dtype))
    fone = const("serq.gqa.fone", np.array(1, np_dtype))
    axes12 = const("serq.gqa.axes12", np.array([1, 2], np.int64))

    mshape = op("Shape", [mask], "mask_shape")
    batch = op("Slice", [mshape, i0, i1], "batch")                     # [1]
    total_1d = op("Slice", [mshape, i1, i2], "total_1d")               # [1]
    total = op("Gather", [mshape, axis1], "total", axis=0)             # scalar
    seqlens = op("Cast", [op("Expand", [op("Sub", [total, one], "total_minus_1"), batch],
                            "seqlens_i64")], "seqlens_k", to=ir.DataType.INT32)
    total_len = op("Cast", [total], "total_sequence_length", to=ir.DataType.INT32)
    seq = op("Slice", [op("Shape", [positions], "positions_shape"), i1, i2], "seq")
    masked = op("Mul", [op("Sub", [fone, op("Cast", [mask], "mask_float", to=dtype)], "unmasked"),
                        lowest], "mask_bias")
    bias = op("Expand", [op("Unsqueeze", [masked, axes12], "mask_bias_4d"),
                         op("Concat", [batch, i1, seq, total_1d], "bias_shape", axis=0)],
              "attention_bias")
    return seqlens, total_len, bias
