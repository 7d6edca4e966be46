"""Malformed SerqMatMul models and feeds, and a worker that runs them in its own process.

Every case must end in a clean onnxruntime error (session creation or run) whose message
matches the case's pattern -- never a crash, never a silent result. ``mutation-*`` cases change
one attribute or input of a valid model at random; their oracle is the reference: where
``reference.serq_matmul`` raises ContractError the op must raise too, where the op returns a
result the reference must accept the inputs and agree with it (op_models.check_close).

``python op_malformed_cases.py NAME...`` prints one JSON line per case: ``{"start": name}``
before it runs, then its outcome, so the parent (test_op_malformed.py) can tell which case
killed the process if one does. ``SERQ_MALFORMED_MUTATIONS=N`` sets the number of mutation
cases (200).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from op_models import IR_VERSION, OPSET, Case, check_close, feeds, make_model, random_case
from serq_onnx import reference as ref

K, N, RANK, GW, GA = 96, 12, 16, 32, 16  # K_ext = 128: B [12, 64], scales [12, 4], wsum [12, 8]


@dataclass
class Malformed:
    model: bytes
    feeds: dict
    pattern: str | None  # regex the error must match; None: any clean error is right
    stage: str = "any"  # "create" | "run" | "any": where the error must come from
    oracle: Callable | None = None  # mutation cases: judges the outcome against the reference
    info: dict = field(default_factory=dict)


def _case(**kw) -> Case:
    return random_case(K, N, RANK, GW, GA, seed=31, act_scale=True, act_perm=np.int64, bias=True,
                       **kw)


def _A(rows=2, k=K, dtype=np.float32):
    return np.random.default_rng(5).standard_normal((rows, k)).astype(dtype)


def _graph_model(names, inits, inputs, attrs, out_elem=TensorProto.FLOAT) -> bytes:
    node = helper.make_node(ref.OP_TYPE, names, ["Y"], domain=ref.DOMAIN, name="serq_node",
                            **attrs)
    graph = helper.make_graph([node], "serq_matmul", inputs,
                              [helper.make_tensor_value_info("Y", out_elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(ref.DOMAIN, ref.OP_VERSION)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def _custom(case: Case, *, override: dict | None = None, drop: tuple = (), extra_inputs=0,
            a_elem=TensorProto.FLOAT, a_shape=("M", K)) -> bytes:
    """A model with free control over initializer arrays (dtype, shape) and input names."""
    arrays = {"B": case.B, "scales": case.scales, "wsum": case.wsum, **case.optional_inputs()}
    arrays.update(override or {})
    names = ["A"]
    inits = []
    for key in ("B", "scales", "wsum", "act_scale", "act_perm", "bias"):
        if key in drop or arrays[key] is None:
            names.append("")
            continue
        names.append(key)
        inits.append(numpy_helper.from_array(np.asarray(arrays[key]), key))
    names += [f"x{i}" for i in range(extra_inputs)]
    inits += [numpy_helper.from_array(np.zeros(1, np.float32), f"x{i}") for i in range(extra_inputs)]
    while names[-1] == "":
        names.pop()
    inputs = [helper.make_tensor_value_info("A", a_elem, list(a_shape))]
    return _graph_model(names, inits, inputs, case.layout.attributes())


def _attr(name, value, pattern, stage="create"):
    def build():
        case = _case()
        return Malformed(make_model(case, ["M", K], attrs={name: value}), {"A": _A()}, pattern,
                         stage)
    return build


def _init(key, value, pattern, stage="create", **kw):
    def build():
        case = _case()
        return Malformed(_custom(case, override={key: value(case)}, **kw), {"A": _A()}, pattern,
                         stage)
    return build


def _fed(key, value, pattern):
    """The input fed at run time with a bad value: the per-call checks must catch it."""
    def build():
        case = _case()
        fed = ("B", "scales", "wsum", "act_scale", "act_perm", "bias")
        model = make_model(case, ["M", K], fed=fed)
        f = feeds(case, _A(), fed)
        f[key] = value(case)
        return Malformed(model, f, pattern, "run")
    return build


def _feed_A(A, pattern, a_shape=("M", "KK"), dtype=np.float32):
    def build():
        case = _case()
        return Malformed(make_model(case, list(a_shape), dtype), {"A": A}, pattern, "run")
    return build


def _tamper(arr, fn):
    arr = np.array(arr, copy=True)
    fn(arr)
    return arr


def _set(idx, v):
    def fn(a):
        a[idx] = v
    return fn


def _truncated_raw_B():
    case = _case()
    model = helper.make_model(helper.make_graph([], "g", [], []))
    model.ParseFromString(make_model(case, ["M", K]))
    for init in model.graph.initializer:
        if init.name == "B":
            init.raw_data = init.raw_data[:-7]
    return Malformed(model.SerializeToString(), {"A": _A()}, r"Initializer 'B': raw_data size \(761 bytes\) does not match", "create")


ATTR = "SerqMatMul: "
# onnxruntime's own checks of a node against the registered op (types, input count)
TYPE_ERROR = r"Type 'tensor\({t}\)' of input parameter \({name}\) of operator \(SerqMatMul\) in node \(serq_node\) is invalid"
INPUT_COUNT = r"Node\(serq_node\) with schema\(com.serq::SerqMatMul:1\) has input size {n} not in range \[min=4, max=7\]"
CASES: dict[str, Callable[[], Malformed]] = {
    # attributes: missing, wrong type, negative, zero, huge, inconsistent
    **{f"attr_missing_{a}": _attr(a, None, ATTR + rf"missing or non-integer attribute '{a}' \(missing\)")
       for a in ("K", "N", "rank", "group_w", "group_a", "bits_a", "bits_w")},
    "attr_K_float": _attr("K", 96.0, ATTR + r"missing or non-integer attribute 'K' \(it is a float\)"),
    "attr_K_string": _attr("K", "96", ATTR + r"missing or non-integer attribute 'K' \(it is a string\)"),
    "attr_K_list": _attr("K", [96], ATTR + r"missing or non-integer attribute 'K' \(it is a list of integers\)"),
    "attr_scheme_int": _attr("scheme", 1, ATTR + r"attribute 'scheme' must be a string, it is an integer"),
    "attr_scheme_mxfp4": _attr("scheme", "mxfp4", ATTR + r"scheme 'mxfp4' is not supported"),
    "attr_scheme_empty": _attr("scheme", "", ATTR + r"scheme '' is not supported"),
    "attr_K_negative": _attr("K", -96, ATTR + r"attribute K must be >= 1, got -96"),
    "attr_K_zero": _attr("K", 0, ATTR + r"attribute K must be >= 1, got 0"),
    "attr_N_zero": _attr("N", 0, ATTR + r"attribute N must be >= 1, got 0"),
    "attr_N_negative": _attr("N", -(2**63), ATTR + r"attribute N must be >= 1"),
    "attr_rank_negative": _attr("rank", -1, ATTR + r"attribute rank must be in \[0, K=96\], got -1"),
    "attr_rank_gt_K": _attr("rank", 97, ATTR + r"attribute rank must be in \[0, K=96\], got 97"),
    "attr_group_w_negative": _attr("group_w", -32, ATTR + r"attribute group_w must be an even number >= 2, got -32"),
    "attr_group_w_zero": _attr("group_w", 0, ATTR + r"attribute group_w must be an even number >= 2, got 0"),
    "attr_group_w_odd": _attr("group_w", 33, ATTR + r"attribute group_w must be an even number >= 2, got 33"),
    "attr_group_w_huge": _attr("group_w", 2**62, ATTR + r"attribute group_w = 4611686018427387904 is too large for this kernel \(at most 16384\)"),
    "attr_group_a_negative": _attr("group_a", -16, ATTR + r"attribute group_a must be >= 0 \(0 = whole row\), got -16"),
    "attr_group_a_not_divisor": _attr("group_a", 12, ATTR + r"attribute group_a \(12\) must be 0, a multiple of group_w \(32\)"),
    "attr_bits_a_3": _attr("bits_a", 3, ATTR + r"attribute bits_a must be 4 or 8, got 3"),
    "attr_bits_w_huge": _attr("bits_w", 2**40, ATTR + r"attribute bits_w must be 4 or 8, got 1099511627776"),
    "attr_K_huge": _attr("K", 2**40, ATTR + r"attribute K = 1099511627776 is too large for this kernel \(at most 16777216\)"),
    "attr_K_max": _attr("K", 2**63 - 1, ATTR + r"attribute K = 9223372036854775807 is too large"),
    "attr_N_huge": _attr("N", 2**40, ATTR + r"attribute N = 1099511627776 is too large for this kernel \(at most 2147483648\)"),
    "attr_K_mismatch": _attr("K", 100, ATTR + r"B must be uint8 \[N, K_ext / 2\] = \[12, 80\], got uint8 \[12, 64\]"),
    "attr_N_mismatch": _attr("N", 13, ATTR + r"B must be uint8 \[N, K_ext / 2\] = \[13, 64\]"),
    "attr_group_w_mismatch": _attr("group_w", 16, ATTR + r"B must be uint8 \[N, K_ext / 2\] = \[12, 56\], got uint8 \[12, 64\]"),
    "attr_group_a_mismatch": _attr("group_a", 8, ATTR + r"wsum must be int32 \[N, K_ext / block\] = \[12, 16\]"),
    "attr_bits_w_mismatch": _attr("bits_w", 8, ATTR + r"B must be uint8 \[N, K_ext\] = \[12, 128\]"),
    # initializers: shapes, dtypes, values
    "B_truncated": _init("B", lambda c: c.B[:, :-1], ATTR + r"B must be uint8 \[N, K_ext / 2\] = \[12, 64\], got uint8 \[12, 63\]"),
    "B_flat": _init("B", lambda c: c.B.reshape(-1), ATTR + r"B must be uint8 .* got uint8 \[768\]"),
    "B_extra_row": _init("B", lambda c: np.vstack([c.B, c.B[:1]]), ATTR + r"B must be uint8 .* got uint8 \[13, 64\]"),
    "B_int8": _init("B", lambda c: c.B.view(np.int8), TYPE_ERROR.format(t="int8", name="B")),
    "B_raw_data_truncated": _truncated_raw_B,
    "scales_wrong_shape": _init("scales", lambda c: c.scales[:, :-1], ATTR + r"scales must be float32 \[N, K_ext / group_w\] = \[12, 4\], got float32 \[12, 3\]"),
    "scales_transposed": _init("scales", lambda c: c.scales.T.copy(), ATTR + r"scales must be float32 .* got float32 \[4, 12\]"),
    "scales_float16": _init("scales", lambda c: c.scales.astype(np.float16), TYPE_ERROR.format(t="float16", name="scales")),
    "scales_nan": _init("scales", lambda c: _tamper(c.scales, _set((3, 2), np.nan)), ATTR + r"scales\[3, 2\] = nan: weight scales must be finite and positive"),
    "scales_zero": _init("scales", lambda c: _tamper(c.scales, _set((0, 0), 0.0)), ATTR + r"scales\[0, 0\] = 0: weight scales must be finite and positive"),
    "scales_negative": _init("scales", lambda c: -c.scales, ATTR + r"scales\[0, 0\] = -\S+: weight scales must be finite"),
    "scales_inf": _init("scales", lambda c: _tamper(c.scales, _set((11, 3), np.inf)), ATTR + r"scales\[11, 3\] = inf"),
    "wsum_off_by_one": _init("wsum", lambda c: _tamper(c.wsum, lambda a: a.__setitem__((4, 7), a[4, 7] - 1)), ATTR + r"wsum\[4, 7\] = -?\d+ does not match B"),
    "wsum_zeroed": _init("wsum", lambda c: np.zeros_like(c.wsum), ATTR + r"wsum\[\d+, \d+\] = 0 does not match B"),
    "wsum_wrong_block": _init("wsum", lambda c: ref.block_sums(ref.unpack_int4(c.B), GW), ATTR + r"wsum must be int32 \[N, K_ext / block\] = \[12, 8\], got int32 \[12, 4\]"),
    "wsum_int64": _init("wsum", lambda c: c.wsum.astype(np.int64), TYPE_ERROR.format(t="int64", name="wsum")),
    "B_byte_flipped": _init("B", lambda c: _tamper(c.B, lambda a: a.__setitem__((2, 40), a[2, 40] ^ 0x03)), ATTR + r"wsum\[2, 5\] = -?\d+ does not match B"),
    "perm_out_of_range": _init("act_perm", lambda c: _tamper(c.act_perm, _set(7, K)), ATTR + r"act_perm\[7\] = 96 is outside \[0, K=96\)"),
    "perm_negative": _init("act_perm", lambda c: _tamper(c.act_perm, _set(0, -1)), ATTR + r"act_perm\[0\] = -1 is outside"),
    "perm_huge": _init("act_perm", lambda c: _tamper(c.act_perm, _set(1, 2**62)), ATTR + r"act_perm\[1\] = 4611686018427387904 is outside"),
    "perm_duplicate": _init("act_perm", lambda c: _tamper(c.act_perm, _set(1, c.act_perm[0])), ATTR + r"act_perm is not a permutation"),
    "perm_int32_min": _init("act_perm", lambda c: np.full(K, -(2**31), np.int32), ATTR + r"act_perm\[0\] = -2147483648 is outside"),
    "perm_short": _init("act_perm", lambda c: c.act_perm[:-1], ATTR + r"act_perm must be int32 or int64 \[K\] = \[96\], got int64 \[95\]"),
    "perm_float": _init("act_perm", lambda c: c.act_perm.astype(np.float32), TYPE_ERROR.format(t="float", name="act_perm")),
    "act_scale_long": _init("act_scale", lambda c: np.ones(K + 1, np.float32), ATTR + r"act_scale must be float32 \[K\] = \[96\], got float32 \[97\]"),
    "act_scale_2d": _init("act_scale", lambda c: np.ones((1, K), np.float32), ATTR + r"act_scale must be float32 \[K\]"),
    "bias_short": _init("bias", lambda c: np.ones(N - 1, np.float32), ATTR + r"bias must be float32 \[N\] = \[12\], got float32 \[11\]"),
    "bias_float16": _init("bias", lambda c: c.bias.astype(np.float16), TYPE_ERROR.format(t="float16", name="bias")),
    # wrong number of inputs
    "inputs_no_wsum": _init("wsum", lambda c: c.wsum, INPUT_COUNT.format(n=3), drop=("wsum", "act_scale", "act_perm", "bias")),
    "inputs_only_A_B": _init("B", lambda c: c.B, INPUT_COUNT.format(n=2), drop=("scales", "wsum", "act_scale", "act_perm", "bias")),
    "inputs_missing_B_middle": _init("B", lambda c: c.B, r"Node \(serq_node\)'s input 1 is marked single but has an empty string", drop=("B",)),
    "inputs_eight": _init("B", lambda c: c.B, INPUT_COUNT.format(n=8), extra_inputs=1),
    # A: dtype, rank, last dimension at run time
    "A_float64": _init("B", lambda c: c.B, TYPE_ERROR.format(t="double", name="A"), a_elem=TensorProto.DOUBLE),
    "A_int32": _init("B", lambda c: c.B, TYPE_ERROR.format(t="int32", name="A"), a_elem=TensorProto.INT32),
    "A_last_dim_short": _feed_A(_A(3, K - 1), ATTR + r"A's last dimension is 95 but attribute K is 96"),
    "A_last_dim_long": _feed_A(_A(1, K + 32), ATTR + r"A's last dimension is 128 but attribute K is 96"),
    "A_zero_last_dim": _feed_A(np.zeros((4, 0), np.float32), ATTR + r"A's last dimension is 0 but attribute K is 96"),
    "A_scalar": _feed_A(np.array(1.0, np.float32), ATTR + r"A must have at least one dimension", a_shape=()),
    "A_float16_declared_float32": _feed_A(_A(2, K, np.float16), r"Unexpected input data type. Actual: \(tensor\(float16\)\) , expected: \(tensor\(float\)\)", a_shape=("M", K)),
    # inputs fed at run time with bad values
    "fed_wsum_off_by_one": _fed("wsum", lambda c: _tamper(c.wsum, lambda a: a.__setitem__((0, 0), a[0, 0] + 1)), ATTR + r"wsum\[0, 0\] = -?\d+ does not match B"),
    "fed_B_truncated": _fed("B", lambda c: c.B[:-1], ATTR + r"B must be uint8 \[N, K_ext / 2\] = \[12, 64\], got uint8 \[11, 64\]"),
    "fed_B_empty": _fed("B", lambda c: np.zeros((0, 64), np.uint8), ATTR + r"B must be uint8 .* got uint8 \[0, 64\]"),
    "fed_scales_nan": _fed("scales", lambda c: np.full_like(c.scales, np.nan), ATTR + r"scales\[0, 0\] = nan"),
    "fed_scales_3d": _fed("scales", lambda c: c.scales[None], ATTR + r"scales must be float32 .* got float32 \[1, 12, 4\]"),
    "fed_perm_bad": _fed("act_perm", lambda c: np.zeros(K, np.int64), ATTR + r"act_perm is not a permutation: 0 appears twice"),
    "fed_perm_empty": _fed("act_perm", lambda c: np.zeros(0, np.int64), ATTR + r"act_perm must be int32 or int64 \[K\] = \[96\], got int64 \[0\]"),
    "fed_act_scale_empty": _fed("act_scale", lambda c: np.zeros(0, np.float32), ATTR + r"act_scale must be float32 \[K\] = \[96\], got float32 \[0\]"),
    "fed_bias_long": _fed("bias", lambda c: np.zeros(1000, np.float32), ATTR + r"bias must be float32 \[N\] = \[12\], got float32 \[1000\]"),
}


# --------------------------------------------------------------------------- mutations

# What the op rejects beyond reference.check_inputs: scale values (the contract's "any positive
# scale") and sizes past the kernel's index and int32 limits.
OP_ONLY_RULES = r"weight scales must be finite and positive|is too large for this kernel"
_INTS = [-(2**63), -(2**31), -8, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 32, 33, 64, 96, 97,
         128, 2**14, 2**14 + 2, 2**24, 2**31, 2**40, 2**62, 2**63 - 1]
MUTATIONS = int(os.environ.get("SERQ_MALFORMED_MUTATIONS") or 200)


def _mutated(index: int) -> Malformed:
    """One random change of one attribute or input of a valid random model."""
    rng = np.random.default_rng(1000 + index)
    gw = int(rng.choice([2, 4, 6, 10, 16, 32, 64]))
    ga = int(rng.choice([0, gw, 2 * gw] + [d for d in range(1, gw + 1) if gw % d == 0]))
    k = int(rng.integers(1, 80))
    case = random_case(k, int(rng.integers(1, 12)), int(rng.integers(0, k + 1)), gw, ga,
                       int(rng.choice([4, 8])), int(rng.choice([4, 8])), seed=index,
                       act_scale=bool(rng.integers(2)), act_perm=[None, np.int32, np.int64][rng.integers(3)],
                       bias=bool(rng.integers(2)))
    attrs = case.layout.attributes()
    A = rng.standard_normal((int(rng.integers(0, 4)), k)).astype(np.float32)
    what = rng.choice(["attr", "array", "A"], p=[0.45, 0.45, 0.10])
    info = {}
    present = [key for key in ("B", "scales", "wsum", "act_scale", "act_perm", "bias")
               if getattr(case, key) is not None]
    fed = tuple(key for key in present if rng.random() < 0.3)
    if what == "attr":
        name = str(rng.choice(list(attrs)))
        if name == "scheme":
            attrs[name] = str(rng.choice(["int", "mxfp4", "", "INT", "int "]))
        else:
            attrs[name] = int(rng.choice(_INTS + [attrs[name] + d for d in (-2, -1, 1, 2)]))
        info = {"attr": name, "value": attrs[name]}
    elif what == "array":
        key = str(rng.choice(present))
        arr = getattr(case, key)
        op = str(rng.choice(["drop_last", "add_one", "flip", "reshape", "value"]))
        flat = arr.reshape(-1).copy()
        if op == "drop_last" and arr.size > 1:
            arr = arr[..., :-1] if rng.integers(2) else arr[:-1]
        elif op == "add_one":
            arr = np.concatenate([arr, arr[-1:]], axis=0)
        elif op == "reshape":
            arr = flat
        elif flat.size:
            i = int(rng.integers(flat.size))
            if arr.dtype == np.uint8:
                flat[i] ^= np.uint8(1 << int(rng.integers(8)))
            elif arr.dtype.kind == "f":
                flat[i] = rng.choice([np.nan, np.inf, -1.0, 0.0, 1e-45, 3e38, flat[i] * 2])
            else:
                flat[i] = rng.choice([flat[i] + 1, flat[i] - 1, -1, 2**31 - 1, 0]).astype(arr.dtype)
            arr = flat.reshape(arr.shape)
        setattr(case, key, np.ascontiguousarray(arr))
        info = {"array": key, "op": op}
    else:
        A = rng.standard_normal((2, int(rng.choice([k - 1, k + 1, 2 * k])) or 1)).astype(np.float32)
        info = {"A": list(A.shape)}

    model = make_model(case, ["M", "KK"], attrs=attrs, fed=fed)
    f = feeds(case, A, fed)

    def oracle(y, error):
        try:
            with np.errstate(all="ignore"):
                ref.serq_matmul(A.astype(np.float64), case.B, case.scales, case.wsum,
                                **case.optional_inputs(), **attrs)
            ref_error = None
        except (ref.ContractError, ValueError, IndexError, TypeError) as e:
            ref_error = f"{type(e).__name__}: {e}"
        if y is None:  # the op refused: the reference must too, but for the op's own limits
            if "SerqMatMul: " not in error:
                return f"error without a SerqMatMul message: {error}"
            if ref_error is None and not re.search(OP_ONLY_RULES, error):
                return f"the op rejected inputs the reference accepts: {error}"
            return None
        if ref_error is not None:
            return f"the op returned a result where the reference raises {ref_error}"
        try:
            L = ref.Layout(**{k: v for k, v in attrs.items() if k != "scheme"})
            check_close(Case(L, case.B, case.scales, case.wsum, case.act_scale, case.act_perm,
                             case.bias), A, y, allow_overflow=True)
        except AssertionError as e:
            return f"result differs from the reference: {e}"
        return None

    info["fed"] = list(fed)
    return Malformed(model, f, None, "any", oracle, info)


for _i in range(MUTATIONS):
    CASES[f"mutation-{_i:03d}"] = (lambda i: lambda: _mutated(i))(_i)


# --------------------------------------------------------------------------- worker


def run_case(name: str) -> dict:
    """Builds and runs one case; the verdict ``ok`` says whether the op behaved."""
    import serq_onnx

    try:
        m = CASES[name]()
    except Exception as e:  # noqa: BLE001 -- a broken case is a failure, not a crash
        return {"name": name, "stage": "build", "message": repr(e), "ok": False,
                "why": f"building the case failed: {e!r}"}
    out = {"name": name, "info": m.info}
    y, stage, message = None, "ok", ""
    try:
        sess = serq_onnx.session(m.model)
    except Exception as e:  # noqa: BLE001 -- any onnxruntime exception is a clean error
        stage, message = "create", str(e)
    else:
        try:
            y = sess.run(None, m.feeds)[0]
        except Exception as e:  # noqa: BLE001
            stage, message = "run", str(e)
    out.update(stage=stage, message=message[-600:])
    if m.oracle is not None:
        why = m.oracle(y, message)
    elif stage == "ok":
        why = "no error: the op returned a result"
    elif m.stage != "any" and stage != m.stage:
        why = f"error at {stage}, expected at {m.stage}"
    elif m.pattern and not re.search(m.pattern, message):
        why = f"message does not match {m.pattern!r}"
    else:
        why = None
    out.update(ok=why is None, why=why)
    return out


def main(names: list[str]) -> None:
    crash = os.environ.get("SERQ_MALFORMED_ABORT_AT")  # tests the parent's crash handling
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        if name == crash:
            os.abort()
        print(json.dumps(run_case(name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
