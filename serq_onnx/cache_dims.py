"""Fixed sizes for KV-cache dimensions that an exporter left symbolic.

genai's model builder declares ``past_key_values.N.key`` as ``[batch, kv_heads, past,
"kv_cache_dim"]``: the head size is a name, not a number. The harness (calibration, checks,
evaluation) feeds an empty cache of that size, so it must be a number; it is read from the
graph's ``GroupQueryAttention`` nodes (``num_heads``, ``kv_num_heads`` and the width of the
query, or packed query/key/value, projection).
"""

from __future__ import annotations

import re

import onnx_ir as ir

_PAST = re.compile(r"past_key_values\.\d+\.(key|value)$")


def _width(value: ir.Value | None) -> int | None:
    """Output width of a MatMul with a constant 2-D weight behind ``value`` (through a bias
    ``Add``)."""
    p = value.producer() if value is not None else None
    if p is None:
        return None
    if p.op_type == "Add":
        widths = [w for w in (_width(x) for x in p.inputs) if w is not None]
        return widths[0] if len(widths) == 1 else None
    if p.op_type != "MatMul" or len(p.inputs) != 2 or p.inputs[1].const_value is None:
        return None
    shape = p.inputs[1].const_value.shape
    return int(shape[1]) if len(shape) == 2 else None


def gqa_head_size(graph: ir.Graph) -> int | None:
    """The head size every ``GroupQueryAttention`` of ``graph`` agrees on, or None."""
    sizes = set()
    for node in graph:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        heads = node.attributes.get("num_heads")
        kv = node.attributes.get("kv_num_heads")
        if heads is None or kv is None:
            return None
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        width = _width(node.inputs[0])
        total = heads.as_int() + (2 * kv.as_int() if packed else 0)
        if width is None or width % total:
            return None
        sizes.add(width // total)
    return sizes.pop() if len(sizes) == 1 else None


def symbolic_cache_dims(graph: ir.Graph) -> dict[str, int]:
    """``{dim name: size}`` for the head-size dimension of the KV-cache inputs and outputs when
    it is symbolic and the graph says what it is; empty otherwise."""
    names = set()
    for v in list(graph.inputs) + list(graph.outputs):
        name = v.name or ""
        if not (_PAST.match(name) or name.startswith("present.")):
            continue
        if v.shape is not None and len(v.shape) == 4 and isinstance(v.shape[3], ir.SymbolicDim) \
                and v.shape[3].value is not None:
            names.add(v.shape[3].value)
    if not names:
        return {}
    size = gqa_head_size(graph)
    return {} if size is None else {n: size for n in names}


def pin_cache_dims(model: ir.Model) -> dict[str, int]:
    """Replace the symbolic head-size dimension of the KV-cache inputs and outputs by its size,
    in place; returns what was pinned (empty for graphs with fixed sizes, e.g. Optimum's)."""
    dims = symbolic_cache_dims(model.graph)
    if dims:
        for v in list(model.graph.inputs) + list(model.graph.outputs):
            if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in dims
                                           for d in v.shape):
                v.shape = ir.Shape([dims[d.value] if isinstance(d, ir.SymbolicDim)
                                    and d.value in dims else d for d in v.shape])
    return dims


def with_cache_dims(session, path, sess_options, providers: list):
    """``session`` (opened on ``path``), or, if its KV-cache head size is symbolic, a new one
    with that dimension fixed through ``sess_options``' free-dimension overrides."""
    import onnxruntime as ort

    if not any(_PAST.match(i.name) and len(i.shape) == 4 and not isinstance(i.shape[3], int)
               for i in session.get_inputs()):
        return session
    dims = symbolic_cache_dims(ir.load(path).graph)
    if not dims:
        return session
    for name, size in dims.items():
        sess_options.add_free_dimension_override_by_name(name, size)
    return ort.InferenceSession(str(path), sess_options, providers=providers)
