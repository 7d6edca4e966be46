"""SerqMatMul CPU kernel (libserq_onnx_ops.so) against serq_onnx.reference, in onnxruntime."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import serq_onnx  # noqa: E402
from serq_onnx import reference as ref  # noqa: E402

import op_isa  # noqa: E402
from op_models import (  # noqa: E402
    codes_case,
    feeds,
    make_model,
    random_case,
    reference64,
    session,
    tolerance,
)


def _library_error() -> str | None:
    try:
        serq_onnx.get_library_path()
    except serq_onnx.SerqError as e:
        return str(e)
    return None


LIBRARY_ERROR = _library_error()


def test_library_is_built():
    """A missing library is a broken build: one failure here, the rest of the module skips."""
    assert LIBRARY_ERROR is None, LIBRARY_ERROR


@pytest.fixture(autouse=True)
def _needs_library(request):
    if LIBRARY_ERROR is not None and request.node.name != "test_library_is_built":
        pytest.skip("the op library is missing (see test_library_is_built)")


# The kernel picks its instruction set when the session creates it; SERQ_ONNX_ISA caps it, so
# the scalar and AVX2 fallbacks are checked on machines that have AVX512-VNNI too.
ISAS = ["scalar", "avx2", "best"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "best":
        monkeypatch.delenv("SERQ_ONNX_ISA", raising=False)
    else:
        monkeypatch.setenv("SERQ_ONNX_ISA", request.param)
    return request.param


def _activations(shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    # Outlier channels, as in real LLM activations.
    a[..., rng.integers(0, shape[-1], 3)] *= 20.0
    return a.astype(dtype)


def _check(case, A, y, out_dtype=np.float32):
    exact = reference64(case, A)
    assert y.dtype == np.dtype(out_dtype)
    assert y.shape == exact.shape
    nan_ref = np.isnan(exact)
    np.testing.assert_array_equal(np.isnan(y), nan_ref)
    err = np.abs(y.astype(np.float64) - exact)[~nan_ref]
    tol = tolerance(case, A, out_dtype)[~nan_ref]
    bad = err > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off: max err {err.max():.3g}, "
        f"worst err/tol {(err / tol).max():.3g}")
    return float(err.max(initial=0.0)), float((err / tol).max(initial=0.0))


# (K, N, rank, group_w, group_a, bits_w, bits_a, leading dims of A)
SHAPES = {
    "m1": (576, 72, 32, 128, 0, 4, 8, (1,)),
    "odd_m": (576, 40, 0, 128, 128, 4, 8, (7,)),
    "3d_ga_lt_gw": (200, 48, 32, 64, 32, 4, 4, (2, 5)),
    "ga_gt_gw_r_eq_k_w8": (200, 40, 200, 64, 128, 8, 8, (3,)),
    "ga_lt_gw_w8_a4": (576, 40, 128, 128, 64, 8, 4, (5,)),
    "ga_eq_gw": (576, 33, 64, 64, 64, 4, 8, (4,)),
    "k_pad_ga0": (200, 24, 8, 64, 0, 4, 8, (3,)),
    "small_blocks": (100, 20, 10, 16, 8, 4, 8, (3,)),
    "tiny_blocks_w8": (30, 12, 5, 4, 2, 8, 4, (2,)),
    "ga_multiple": (576, 24, 128, 128, 256, 4, 8, (6,)),
    "rank_k_4bit": (128, 16, 128, 128, 0, 4, 4, (2,)),
    "many_rows": (256, 40, 32, 64, 64, 4, 8, (67,)),
    # tile kernels (AMX): row passes of 128 and pairs of 16-row tiles with partial tails, strips
    # of 32 columns with a partial one, blocks of one K step and of several
    "rows300_w4a4": (384, 72, 64, 128, 32, 4, 4, (300,)),
    "rows40_w8a8": (320, 40, 64, 64, 128, 8, 8, (40,)),
    "rows33_block256": (512, 48, 16, 256, 0, 4, 8, (3, 11)),
    "rows17_w8a4_block16": (160, 37, 16, 16, 0, 8, 4, (17,)),
    "w8_block16": (160, 24, 16, 16, 0, 8, 8, (5,)),
    "m1_ga32_a4": (200, 44, 32, 64, 32, 4, 4, (1,)),
    "m1_w8": (576, 36, 64, 128, 0, 8, 8, (1, 1)),
    "m1_n3": (128, 3, 0, 64, 0, 4, 8, (1,)),
    "a_1d": (192, 20, 16, 64, 0, 4, 8, ()),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, isa):
    K, N, r, gw, ga, bw, ba, lead = SHAPES[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=zlib.crc32(name.encode()))
    A = _activations(lead + (K,), seed=7)
    sym = [f"d{i}" for i in range(len(lead))] + [K]
    y = session(make_model(case, sym)).run(None, {"A": A})[0]
    _check(case, A, y)


# (bits_w, block): panel kernels take blocks of whole panel rows (8 codes with 4-bit weights, 4
# with 8-bit); 4-bit blocks of 12 and 8-bit blocks of 6 take the scalar kernel.
CHOICE_CASES = [(4, 128), (4, 32), (4, 8), (4, 12), (8, 128), (8, 4), (8, 6), (4, 96)]


@pytest.mark.parametrize("cap", op_isa.ORDER)
def test_each_instruction_set_runs_and_matches(cap):
    """Every instruction set the CPU has: the kernel that actually ran (its own report, not the
    cap) is the expected one, and its results match the reference."""
    if cap not in op_isa.cpu_isas():
        pytest.skip(f"this CPU lacks {cap} (flags {sorted(op_isa.required_flags(cap))})")
    for bw, block in CHOICE_CASES:
        K, N = 3 * block + 5, 37
        case = random_case(K, N, min(K, 2 * block + 3), block, block, bw, 8, seed=block + bw,
                           act_scale=True, act_perm=np.int32, bias=True)
        sess, used = op_isa.session_with_isa(lambda: session(make_model(case, ["M", K])), cap)
        assert used == op_isa.expected_kernel(cap, bw, block), (cap, bw, block, used)
        for rows in (5, 37):  # decode-sized and tile-sized calls (AMX runs tiles for the latter)
            A = _activations((rows, K), seed=block)
            _check(case, A, sess.run(None, {"A": A})[0])


@pytest.mark.parametrize(
    "act_scale,act_perm,bias",
    [(True, None, False), (False, np.int64, False), (False, np.int32, False),
     (True, np.int64, False), (True, np.int32, True), (False, None, True)],
    ids=["scale", "perm64", "perm32", "scale_perm64", "scale_perm32_bias", "bias_only"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_optional_inputs(act_scale, act_perm, bias, dtype, isa):
    case = random_case(320, 56, 64, 64, 32, 4, 8, seed=3, act_scale=act_scale, act_perm=act_perm,
                       bias=bias)
    A = _activations((2, 3, 320), seed=11, dtype=dtype)
    y = session(make_model(case, [2, "S", 320], dtype)).run(None, {"A": A})[0]
    _check(case, A, y, dtype)


def test_perm_as_graph_input():
    """act_perm fed at run time (int32 and int64 select different registered overloads)."""
    for dtype in (np.int32, np.int64):
        case = random_case(192, 20, 16, 64, 0, 4, 8, seed=5, act_perm=dtype)
        sess = session(make_model(case, ["M", 192], np.float16, perm_as_input=True))
        A = _activations((3, 192), seed=1, dtype=np.float16)
        y = sess.run(None, {"A": A, "act_perm": case.act_perm})[0]
        _check(case, A, y, np.float16)


@pytest.mark.parametrize("perm", [None, np.int32, np.int64], ids=["noperm", "perm32", "perm64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_output_type_inferred(dtype, perm):
    """The output feeds another node untyped: onnxruntime must infer A's dtype for it, also with
    skipped ("") optional inputs before bias."""
    case = random_case(128, 16, 0, 64, 0, seed=4, act_perm=perm, bias=True)
    A = _activations((2, 128), seed=6, dtype=dtype)
    y = session(make_model(case, ["M", 128], dtype, consumer=True)).run(None, {"A": A})[0]
    assert y.dtype == np.dtype(dtype)
    exact = reference64(case, A)
    tol = 2 * tolerance(case, A, dtype)
    assert (np.abs(y.astype(np.float64) - 2 * exact) <= tol).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_nonfinite_rows(dtype, isa):
    case = random_case(200, 30, 32, 64, 64, 4, 8, seed=9, act_scale=True, bias=True)
    A = _activations((5, 200), seed=2, dtype=dtype)
    A[1, 17] = np.nan
    A[3, 0] = np.inf
    y = session(make_model(case, ["M", 200], dtype)).run(None, {"A": A})[0]
    assert np.isnan(y[[1, 3]]).all()
    assert np.isfinite(y[[0, 2, 4]]).all()
    _check(case, A, y, dtype)


@pytest.mark.parametrize("bits_a", [8, 4])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_whole_tiles_with_bias(dtype, rows, bits_a, isa):
    """N spanning whole register tiles (64 and 16 columns) and a partial one: the tile kernels'
    direct float32 stores, with the bias added and a non-finite row left to StoreRow."""
    case = random_case(384, 136, 64, 128, 128 if bits_a == 8 else 32, 4, bits_a, seed=rows,
                       act_scale=True, bias=True)
    A = _activations((rows, 384), seed=rows + bits_a, dtype=dtype)
    if rows > 1:
        A[rows - 2, 5] = np.nan
    y = session(make_model(case, ["M", 384], dtype)).run(None, {"A": A})[0]
    if rows > 1:
        assert np.isnan(y[rows - 2]).all() and np.isfinite(np.delete(y, rows - 2, 0)).all()
    _check(case, A, y, dtype)


def _tie_activations(rows, K, group, bits_a, seed):
    """Rows whose every activation group has lo = -z, hi = qmax - z, so scale == 1 exactly and
    x / scale lands on many exact .5 ties: rint must round half to even as the reference does."""
    rng = np.random.default_rng(seed)
    qmax = 2**bits_a - 1
    g = group or K
    A = np.empty((rows, K), np.float32)
    for m in range(rows):
        z = int(rng.integers(1, qmax))
        A[m] = rng.integers(-z, qmax - z, K) + rng.choice([0.0, 0.5], K)
        A[m] = np.clip(A[m], -z, qmax - z)
        for g0 in range(0, K, g):
            A[m, g0], A[m, min(g0 + 1, K - 1)] = -z, qmax - z
    return A


@pytest.mark.parametrize("ext", [False, True], ids=["main", "salient"])
@pytest.mark.parametrize("bits_w,bits_a,group_w,group_a",
                         [(4, 8, 64, 0), (4, 4, 64, 32), (8, 8, 64, 128), (8, 4, 16, 8),
                          (4, 8, 64, 64)])
def test_activation_codes_identical(ext, bits_w, bits_a, group_w, group_a, isa):
    """Each output is one dequantized activation ((q - z) * scale): a single differing code would
    be off by a whole quantization step, far above the float32 rounding checked here."""
    K, rank = 200, 136
    N = rank if ext else K
    case = codes_case(K, N, rank, group_w, group_a, bits_w, bits_a, ext=ext)
    A = np.concatenate([_tie_activations(3, K, group_a, bits_a, seed=4),
                        _activations((3, K), seed=5)])
    y = session(make_model(case, ["M", K])).run(None, {"A": A})[0]
    x = ref.prepare_activations(A)
    q, sa, za = ref.quantize_activations(x, bits_a, group_a)
    want = ref.dequantize_activations(q, sa, za, group_a)[:, np.arange(N) % (rank if ext else K)]
    step = np.repeat(sa, group_a or K, axis=1)[:, :K][:, np.arange(N) % (rank if ext else K)]
    err = np.abs(y - want)
    assert (err <= 2.0**-23 * np.abs(want)).all(), f"max err / step {(err / step).max():.3g}"
    # the reference agrees, and ties were really exercised
    np.testing.assert_allclose(reference64(case, A), want, rtol=1e-12, atol=0)
    assert (np.abs(x[:3] - np.rint(x[:3])) == 0.5).sum() > 100


def test_threading_is_deterministic():
    case = random_case(576, 200, 64, 128, 0, 4, 8, seed=1, act_scale=True, act_perm=np.int64)
    model = make_model(case, ["M", 576])
    A = _activations((37, 576), seed=3)
    y1 = session(model, threads=1).run(None, {"A": A})[0]
    y4 = session(model, threads=4).run(None, {"A": A})[0]
    np.testing.assert_array_equal(y1, y4)
    _check(case, A, y1)


def test_empty_batch():
    case = random_case(128, 16, 0, 64, 0)
    y = session(make_model(case, ["M", 128])).run(None, {"A": np.zeros((0, 128), np.float32)})[0]
    assert y.shape == (0, 16)


def test_max_error_report(capsys):
    """Prints the measured error next to its bound for a model-sized layer (SmolLM2 q_proj)."""
    case = random_case(576, 576, 64, 128, 0, 4, 8, seed=2, act_scale=True, act_perm=np.int64)
    A = _activations((8, 576), seed=4)
    y = session(make_model(case, ["M", 576])).run(None, {"A": A})[0]
    err, ratio = _check(case, A, y)
    with capsys.disabled():
        print(f"\n[SerqMatMul cpu] 576x576 r=64: max |err| {err:.3g}, max err/bound {ratio:.3g}")


# --------------------------------------------------------------------------- errors


def _run(model, A, **feeds):
    return session(model).run(None, {"A": A, **feeds})[0]


def test_wrong_k_raises():
    case = random_case(576, 16, 0, 128, 0)
    model = make_model(case, ["M", 575])
    with pytest.raises(Exception, match=r"SerqMatMul: A's last dimension is 575 but attribute K is 576"):
        _run(model, np.zeros((2, 575), np.float32))


@pytest.mark.parametrize("attrs,pattern", [
    ({"bits_a": 3}, r"SerqMatMul: attribute bits_a must be 4 or 8, got 3"),
    ({"bits_w": 2}, r"SerqMatMul: attribute bits_w must be 4 or 8"),
    ({"group_w": 63}, r"SerqMatMul: attribute group_w must be an even number"),
    ({"group_a": 48}, r"SerqMatMul: attribute group_a \(48\) must be 0, a multiple of group_w"),
    ({"rank": 300}, r"SerqMatMul: attribute rank must be in \[0, K=256\]"),
    ({"scheme": "mxfp4"}, r"SerqMatMul: scheme 'mxfp4' is not supported"),
    ({"K": None}, r"SerqMatMul: missing or non-integer attribute 'K'"),
])
def test_invalid_attributes_raise(attrs, pattern):
    case = random_case(256, 16, 32, 64, 0)
    model = make_model(case, ["M", 256], attrs=attrs)
    with pytest.raises(Exception, match=pattern):
        _run(model, np.zeros((1, 256), np.float32))


def test_wrong_weight_shapes_raise():
    case = random_case(256, 16, 32, 64, 0)  # K_ext = 256 + 64
    with pytest.raises(Exception, match=r"SerqMatMul: B must be uint8 \[N, K_ext / 2\] = \[16, 160\]"):
        _run(make_model(case, ["M", 256], B_shape_override=(16, 128)), np.zeros((1, 256), np.float32))
    case.wsum = case.wsum[:, :-1].copy()
    with pytest.raises(Exception, match=r"SerqMatMul: wsum must be int32"):
        _run(make_model(case, ["M", 256]), np.zeros((1, 256), np.float32))


def test_bad_perm_raises():
    case = random_case(64, 8, 0, 32, 0, act_perm=np.int64)
    sess = session(make_model(case, ["M", 64], perm_as_input=True))
    A = np.ones((1, 64), np.float32)
    perm = np.arange(64, dtype=np.int64)
    perm[5] = 64
    with pytest.raises(Exception, match=r"SerqMatMul: act_perm\[5\] = 64 is outside \[0, K=64\)"):
        sess.run(None, {"A": A, "act_perm": perm})
    perm[5] = 4
    with pytest.raises(Exception, match=r"SerqMatMul: act_perm is not a permutation"):
        sess.run(None, {"A": A, "act_perm": perm})
    with pytest.raises(Exception, match=r"SerqMatMul: act_perm must be int32 or int64 \[K\] = \[64\]"):
        sess.run(None, {"A": A, "act_perm": perm[:10]})
    # the session is still usable after the errors
    y = sess.run(None, {"A": A, "act_perm": np.arange(64, dtype=np.int64)})[0]
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", ["m1", "m1_ga32_a4", "m1_w8", "m1_n3", "3d_ga_lt_gw",
                                  "ga_lt_gw_w8_a4", "many_rows", "k_pad_ga0", "w8_block16",
                                  "rows300_w4a4", "rows40_w8a8", "rows33_block256",
                                  "rows17_w8a4_block16"])
def test_instruction_sets_agree_bitwise(name, monkeypatch):
    """All micro-kernels compute exact integer block sums and combine them with the same float32
    operations in the same order, so their outputs are identical, not just close."""
    K, N, r, gw, ga, bw, ba, lead = SHAPES[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=21, act_scale=True, act_perm=np.int32,
                       bias=True)
    model = make_model(case, [f"d{i}" for i in range(len(lead))] + [K])
    A = _activations(lead + (K,), seed=8)
    outs = {}
    for isa in op_isa.ORDER:
        monkeypatch.setenv("SERQ_ONNX_ISA", isa)
        outs[isa] = session(model).run(None, {"A": A})[0]
    for isa in op_isa.ORDER[1:]:
        np.testing.assert_array_equal(outs[isa], outs["scalar"], err_msg=isa)


# (K, N, rank, group_w, group_a, bits_w, bits_a, leading dims of A): odd blocks, which start at
# odd k every other block, so 4-bit codes begin in the high nibble of a byte.
ODD_BLOCKS = {
    "ga1_gw6": (20, 9, 7, 6, 1, 4, 8, (3,)),
    "ga3_gw6": (25, 11, 8, 6, 3, 4, 4, (5,)),
    "ga5_gw10": (33, 13, 12, 10, 5, 4, 8, (1,)),
    "ga1_gw128": (150, 10, 20, 128, 1, 4, 8, (2,)),
    "ga3_gw6_w8": (25, 11, 8, 6, 3, 8, 8, (4,)),
    "ga5_gw10_m1": (40, 17, 40, 10, 5, 4, 4, (1, 1)),
}


@pytest.mark.parametrize("name", list(ODD_BLOCKS))
def test_odd_blocks_match_reference(name, isa):
    K, N, r, gw, ga, bw, ba, lead = ODD_BLOCKS[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=zlib.crc32(name.encode()), act_scale=True,
                       act_perm=np.int64, bias=True)
    A = _activations(lead + (K,), seed=13)
    y = session(make_model(case, [f"d{i}" for i in range(len(lead))] + [K])).run(None, {"A": A})[0]
    _check(case, A, y)


# --------------------------------------------------------------------------- weight values

WEIGHTS = ("B", "scales", "wsum")


def test_fed_weights_match_constant_weights(isa):
    """Weights fed at run time take the per-call checks; results equal the constant-weight path."""
    case = random_case(150, 21, 20, 10, 5, 4, 8, seed=17, act_scale=True, act_perm=np.int32,
                       bias=True)
    A = _activations((4, 150), seed=2)
    y_const = session(make_model(case, ["M", 150])).run(None, {"A": A})[0]
    fed = WEIGHTS + ("act_scale", "act_perm", "bias")
    y_fed = session(make_model(case, ["M", 150], fed=fed)).run(None, feeds(case, A, fed))[0]
    np.testing.assert_array_equal(y_fed, y_const)
    _check(case, A, y_const)


def _tampered(name):
    case = random_case(96, 12, 16, 32, 16, 4, 8, seed=23, act_perm=np.int64)
    if name == "wsum_off_by_one":
        case.wsum = case.wsum.copy()
        case.wsum[5, 3] += 1
        return case, r"wsum\[5, 3\] = -?\d+ does not match B: the codes of block 3 \(16 codes\) of column 5"
    if name == "B_byte_flipped":  # one code changed, wsum left as it was
        case.B = case.B.copy()
        case.B[7, 20] ^= 0x10
        return case, r"wsum\[7, 2\] = -?\d+ does not match B"
    if name == "perm_duplicate":
        case.act_perm = case.act_perm.copy()
        case.act_perm[3] = case.act_perm[4]
        return case, r"act_perm is not a permutation: \d+ appears twice"
    case.scales = case.scales.copy()
    case.scales[2, 1] = {"scale_nan": np.nan, "scale_zero": 0.0, "scale_negative": -0.5,
                         "scale_inf": np.inf}[name]
    return case, r"scales\[2, 1\] = \S+: weight scales must be finite and positive"


TAMPERED = ["wsum_off_by_one", "B_byte_flipped", "perm_duplicate", "scale_nan", "scale_zero",
            "scale_negative", "scale_inf"]


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_constant_weights_fail_session_creation(name):
    case, pattern = _tampered(name)
    with pytest.raises(Exception, match=r"SerqMatMul: " + pattern + r".*\(node 'serq_node'\)"):
        session(make_model(case, ["M", 96]))


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_fed_weights_fail_each_run(name):
    case, pattern = _tampered(name)
    fed = WEIGHTS + ("act_perm",)
    sess = session(make_model(case, ["M", 96], fed=fed))
    A = _activations((2, 96), seed=1)
    for _ in range(2):
        with pytest.raises(Exception, match=r"serq_node.*SerqMatMul: " + pattern):
            sess.run(None, feeds(case, A, fed))
    good = random_case(96, 12, 16, 32, 16, 4, 8, seed=23, act_perm=np.int64)
    y = sess.run(None, feeds(good, A, fed))[0]
    _check(good, A, y)


def test_reference_rejects_what_the_op_rejects():
    """wsum, B, act_perm and scale tampering is a ContractError in the reference too (the
    contract: any code in range, any positive scale)."""
    for name in TAMPERED:
        case, _ = _tampered(name)
        A = _activations((2, 96), seed=1)
        with pytest.raises(ref.ContractError):
            reference64(case, A)
