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
        if key in fed:  # no declared shape: the op's own checks see whatever is fed
            inputs.append(helper.make_tensor_value_info(
                key, helper.np_dtype_to_tensor_dtype(arr.dtype), None))
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


def _ext_terms(case: Case, A: np.ndarray):
    """``(sum_k |deq_a[k] * w_ext[n, k]|, sum_k |q_a[k] - zero| * |code[n, k]|)`` per output
    element: the scale of float32 rounding, and a bound on the summed |integer block sums|."""
    L = case.layout
    x = ref.prepare_activations(np.asarray(A).reshape(-1, L.K), case.act_scale, case.act_perm)
    q, sa, za = ref.quantize_activations(x, L.bits_a, L.group_a)
    idx = np.arange(L.K) // (L.group_a or L.K)
    xi = np.abs(q.astype(np.float64) - za[:, idx])
    xd = np.abs(np.nan_to_num(ref.dequantize_activations(q, sa, za, L.group_a)))
    codes = np.abs(ref.unpack_weight_codes(case.B, L.bits_w).astype(np.float64))
    w = codes * np.repeat(case.scales.astype(np.float64), L.group_w, axis=1)
    out = []
    for xv, wv in ((xd, w), (xi, codes)):
        x_ext = np.zeros((xv.shape[0], L.K_ext))
        x_ext[:, : L.K] = xv
        x_ext[:, L.K_pad : L.K_pad + L.rank] = xv[:, : L.rank]
        out.append((x_ext @ wv.T).reshape(np.shape(A)[:-1] + (L.N,)))
    return out[0], out[1]


def abs_terms(case: Case, A: np.ndarray) -> np.ndarray:
    """``sum_k |deq_a[k] * w_ext[n, k]|`` per output element: the scale of float32 rounding."""
    return _ext_terms(case, A)[0]


def tolerance(case: Case, A: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """Bound on |kernel - exact| from float32 arithmetic: per block, sa*sw and its product with
    the exact integer sum (and the int -> float conversion) round once each; the sum over
    n_blocks blocks plus the bias adds one rounding per term. So <= (n_blocks + 5) * u * terms,
    u = 2^-24, plus u * |bias|. Where results are subnormal a rounding errs by up to 2^-150
    absolute instead, and a rounded sa*sw is multiplied by the integer block sum: hence
    2^-149 * (sum |integer block sums| + n_blocks + 5) more. A float16 output adds half an ulp
    of float16."""
    L = case.layout
    u = 2.0**-24
    n_blocks = -(-L.K // L.block) + -(-L.rank // L.block)
    terms, int_terms = _ext_terms(case, A)
    tol = (n_blocks + 5) * u * terms + 2.0**-149 * (int_terms + n_blocks + 5)
    exact = reference64(case, A)
    if case.bias is not None:
        tol = tol + u * np.abs(case.bias.astype(np.float64))
    if np.dtype(out_dtype) == np.float16:
        tol = tol * 2 + np.abs(np.nan_to_num(exact)) * 2.0**-11 + 2.0**-25  # half-ulp + subnormals
    return tol


# |v| at and above which rounding to the dtype gives inf: its largest finite value plus half an ulp.
OVERFLOW = {np.dtype(np.float16): 65520.0, np.dtype(np.float32): 2.0**128 - 2.0**103}


def out_of_range(case: Case, A: np.ndarray) -> np.ndarray:
    """Outputs where float32 arithmetic may overflow on the way (the partial sums, or a block's
    a_scale * w_scale, come within 2^-3 of float32's range), so the contract's float32
    accumulation does not determine them: only tampered weights or activations beyond ~1e33
    get there."""
    L = case.layout
    terms = abs_terms(case, A)
    x = ref.prepare_activations(np.asarray(A).reshape(-1, L.K), case.act_scale, case.act_perm)
    _, sa, _ = ref.quantize_activations(x, L.bits_a, L.group_a)
    blk = np.arange(L.K_ext) // L.block  # per-block maxima of sa * sw over the extended row
    k_src = np.where(np.arange(L.K_ext) < L.K_pad, np.arange(L.K_ext), np.arange(L.K_ext) - L.K_pad)
    ga = np.minimum(k_src, L.K - 1) // (L.group_a or L.K)
    sa_k = np.nan_to_num(sa[:, ga].astype(np.float64))  # [M, K_ext]
    sw_k = np.repeat(case.scales.astype(np.float64), L.group_w, axis=1)  # [N, K_ext]
    first = np.r_[True, blk[1:] != blk[:-1]]
    prod = (np.abs(sa_k[:, None, first]) * np.abs(sw_k[None, :, first])).max(axis=2, initial=0)
    bound = terms + prod.reshape(terms.shape)
    if case.bias is not None:
        bound = bound + np.abs(case.bias.astype(np.float64))
    return ~(bound < 2.0**125)


def check_close(case: Case, A: np.ndarray, y: np.ndarray, out_dtype=np.float32, *,
                allow_overflow: bool = False) -> float:
    """Asserts ``y`` (the op's output) is the reference's within :func:`tolerance`: same shape
    and dtype, NaN exactly in the reference's NaN rows, finite values within the bound, and inf
    only where the exact value is within the bound of the dtype's overflow threshold, with its
    sign. Outputs :func:`out_of_range` must not occur, or with ``allow_overflow`` are not
    checked. Returns the worst error / bound ratio over the checked outputs."""
    with np.errstate(all="ignore"):
        exact = reference64(case, A)
        assert y.dtype == np.dtype(out_dtype), (y.dtype, out_dtype)
        assert y.shape == exact.shape, (y.shape, exact.shape)
        skip = out_of_range(case, A)
        if not allow_overflow:
            assert not skip.any(), f"{skip.sum()} outputs where float32 may overflow"
        nan_ref = np.isnan(exact)
        np.testing.assert_array_equal(np.isnan(y) & ~skip, nan_ref & ~skip,
                                      err_msg="NaN outputs differ")
        y64 = y.astype(np.float64)
        tol = tolerance(case, A, out_dtype)
        inf = np.isinf(y64) & ~skip
        ok = (np.abs(exact) + tol >= OVERFLOW[np.dtype(out_dtype)]) & (np.sign(y64) == np.sign(exact))
        assert ok[inf].all(), f"inf where the exact value is {exact[inf & ~ok][:4]}"
        fin = ~nan_ref & ~inf & ~skip
        err, t = np.abs(y64 - exact)[fin], tol[fin]
    bad = err > t
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off: max err {err.max():.3g}, "
        f"worst err/tol {(err / t).max():.3g}")
    return float((err / t).max(initial=0.0))
