"""Single-node SerqMatMul models and their reference outputs, for the op-library tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from serq_onnx import reference as ref

OPSET = 18
IR_VERSION = 10
_DTYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass
class Case:
    layout: ref.Layout
    B: np.ndarray
    scales: np.ndarray
    wsum: np.ndarray
    act_scale: np.ndarray | None = None
    act_perm: np.ndarray | None = None
    bias: np.ndarray | None = None

    def optional_inputs(self) -> dict:
        return dict(act_scale=self.act_scale, act_perm=self.act_perm, bias=self.bias)


def random_case(K, N, rank, group_w, group_a, bits_w=4, bits_a=8, *, seed=0, act_scale=False,
                act_perm=None, bias=False) -> Case:
    """Weights from ``reference.build_serq_weights`` on random data; ``act_perm`` is a dtype."""
    rng = np.random.default_rng(seed)
    L = ref.Layout(K=K, N=N, rank=rank, group_w=group_w, group_a=group_a, bits_w=bits_w,
                   bits_a=bits_a)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    # A few salient rows with larger magnitude, as the SERQ correction targets.
    w[: max(rank, 1)] *= 4.0
    wts = ref.build_serq_weights(w, L)
    case = Case(L, wts.B, wts.scales, wts.wsum)
    if act_scale:
        case.act_scale = rng.uniform(0.25, 4.0, K).astype(np.float32)
    if act_perm is not None:
        case.act_perm = rng.permutation(K).astype(act_perm)
    if bias:
        case.bias = rng.standard_normal(N).astype(np.float32)
    return case


def codes_case(K, N, rank, group_w, group_a, bits_w=4, bits_a=8, *, ext=False) -> Case:
    """Weights that pick single channels: column n has code 1 (scale 1) at main row n % K, or
    with ``ext`` at extended row K_pad + n % rank, so each output is one dequantized activation
    and any activation-code mismatch shows up as an error of a whole quantization step."""
    L = ref.Layout(K=K, N=N, rank=rank, group_w=group_w, group_a=group_a, bits_w=bits_w,
                   bits_a=bits_a)
    codes = np.zeros((N, L.K_ext), dtype=np.int8)
    for n in range(N):
        if ext:
            codes[n, L.K_pad + n % rank] = 1
        else:
            codes[n, n % K] = 1
    scales = np.ones((N, L.K_ext // group_w), dtype=np.float32)
    return Case(L, ref.pack_weight_codes(codes, bits_w), scales, ref.block_sums(codes, L.block))


def make_model(case: Case, a_shape, a_dtype=np.float32, *, attrs: dict | None = None,
               B_shape_override=None, perm_as_input=False, consumer=False,
               fed: tuple[str, ...] = ()) -> bytes:
    """A model computing ``Y = SerqMatMul(A, ...)`` with the weights as initializers.

    ``a_shape`` may hold strings (symbolic dims). ``attrs`` overrides node attributes (a value of
    None removes one). ``consumer``: the op's output is an untyped intermediate feeding
    ``Y = Add(t, t)``, so onnxruntime has to infer its type. ``fed`` names inputs (``B``,
    ``scales``, ``wsum``, ``act_scale``, ``act_perm``, ``bias``) that become graph inputs, fed at
    run time (:func:`feeds`), instead of constant initializers; ``perm_as_input`` is
    ``fed=("act_perm",)``.
    """
    fed = set(fed) | ({"act_perm"} if perm_as_input else set())
    L = case.layout
    a_dtype = np.dtype(a_dtype)
    elem = _DTYPE[a_dtype]
    B = case.B if B_shape_override is None else np.zeros(B_shape_override, np.uint8)
    inputs = [helper.make_tensor_value_info("A", elem, list(a_shape))]
    inits = []
    names = ["A", "B", "scales", "wsum", "", "", ""]
    for i, key in enumerate(("B", "scales", "wsum", "act_scale", "act_perm", "bias"), start=1):
        arr = B if key == "B" else getattr(case, key)
        if arr is None:
            continue
        names[i] = key
        if key in fed:
            dims = [f"{key}_{d}" for d in range(arr.ndim)]
            inputs.append(helper.make_tensor_value_info(
                key, helper.np_dtype_to_tensor_dtype(arr.dtype), dims))
        else:
            inits.append(numpy_helper.from_array(arr, key))
    while names[-1] == "":
        names.pop()
    node_attrs = L.attributes()
    for k, v in (attrs or {}).items():
        if v is None:
            node_attrs.pop(k, None)
        else:
            node_attrs[k] = v
    nodes = [helper.make_node(ref.OP_TYPE, names, ["t" if consumer else "Y"], domain=ref.DOMAIN,
                              name="serq_node", **node_attrs)]
    if consumer:
        nodes.append(helper.make_node("Add", ["t", "t"], ["Y"]))
    out_shape = list(a_shape[:-1]) + [L.N]
    graph = helper.make_graph(nodes, "serq_matmul", inputs,
                              [helper.make_tensor_value_info("Y", elem, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(ref.DOMAIN, ref.OP_VERSION)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def feeds(case: Case, A: np.ndarray, fed: tuple[str, ...] = ()) -> dict:
    """Run-time inputs of a :func:`make_model` model: ``A`` and the ``fed`` ones."""
    out = {"A": A}
    for key in fed:
        out[key] = getattr(case, key)
    return out


def session(model: bytes, *, threads: int | None = None):
    import onnxruntime as ort

    import serq_onnx

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    so = serq_onnx.session_options(so)
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def reference64(case: Case, A: np.ndarray) -> np.ndarray:
    """The reference in float64 (A passed as float64: ``prepare_activations`` casts it to float32
    first, so the activation codes are those of A's own dtype, and nothing is rounded at the end)."""
    A64 = np.asarray(A).astype(np.float64)
    return ref.serq_matmul(A64, case.B, case.scales, case.wsum, **case.optional_inputs(),
                           **case.layout.attributes())


def abs_terms(case: Case, A: np.ndarray) -> np.ndarray:
    """``sum_k |deq_a[k] * w_ext[n, k]|`` per output element: the scale of float32 rounding."""
    L = case.layout
    x = ref.prepare_activations(np.asarray(A).reshape(-1, L.K), case.act_scale, case.act_perm)
    q, sa, za = ref.quantize_activations(x, L.bits_a, L.group_a)
    xd = np.abs(np.nan_to_num(ref.dequantize_activations(q, sa, za, L.group_a)))
    x_ext = np.zeros((xd.shape[0], L.K_ext))
    x_ext[:, : L.K] = xd
    x_ext[:, L.K_pad : L.K_pad + L.rank] = xd[:, : L.rank]
    codes = ref.unpack_weight_codes(case.B, L.bits_w).astype(np.float64)
    w = np.abs(codes * np.repeat(case.scales.astype(np.float64), L.group_w, axis=1))
    out = x_ext @ w.T
    return out.reshape(np.shape(A)[:-1] + (L.N,))


def tolerance(case: Case, A: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """Bound on |kernel - exact| from float32 arithmetic: per block, sa*sw and its product with
    the exact integer sum (and the int -> float conversion) round once each; the sum over
    n_blocks blocks plus the bias adds one rounding per term. So <= (n_blocks + 5) * u * terms,
    u = 2^-24, plus u * |bias|; a float16 output adds half an ulp of float16."""
    L = case.layout
    u = 2.0**-24
    n_blocks = -(-L.K // L.block) + -(-L.rank // L.block)
    tol = (n_blocks + 5) * u * abs_terms(case, A)
    exact = reference64(case, A)
    if case.bias is not None:
        tol = tol + u * np.abs(case.bias.astype(np.float64))
    if np.dtype(out_dtype) == np.float16:
        tol = tol * 2 + np.abs(np.nan_to_num(exact)) * 2.0**-11 + 2.0**-25  # half-ulp + subnormals
    return tol + 1e-30
