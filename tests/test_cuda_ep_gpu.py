"""SerqMatMul on onnxruntime's CUDA execution provider (marked gpu).

They need a CUDA device, onnxruntime with the CUDA provider (onnxruntime-gpu) and the library
built with SERQ_BUILD_CUDA=ON; without any of them they are skipped, saying which is missing.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import serq_onnx  # noqa: E402
from kernel_tolerance import check  # noqa: E402
from op_models import codes_case, feeds, make_model, random_case  # noqa: E402

pytestmark = pytest.mark.gpu


def _cuda_devices() -> int:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    n = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


def _why_not() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (needs onnxruntime-gpu)"
    if not _cuda_devices():
        return "no CUDA device (libcuda.so.1 missing or no GPU)"
    try:
        lib = serq_onnx.get_library_path()
    except serq_onnx.SerqError as e:
        return str(e)
    with open(lib, "rb") as f:
        if b"CUDAExecutionProvider" not in f.read():
            return f"{lib} was built without its CUDA part (SERQ_BUILD_CUDA=ON)"
    return None


_REASON = _why_not()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

OUT = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def _cuda_session(model: bytes, provider_options: dict | None = None):
    so = ort.SessionOptions()
    # Every node on CUDA or the session fails: a SerqMatMul silently run by the CPU kernel would
    # make these tests vacuous.
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return serq_onnx.session(model, providers=[("CUDAExecutionProvider", provider_options or {})],
                             sess_options=so)


LAYOUTS = {
    # fast path (int8 tensor cores): w4a8 / w4a4 groups, whole-row groups, odd sizes, rank 0
    "w4a8_g128": dict(K=512, N=256, rank=128, group_w=128, group_a=128),
    "w4a4_g32": dict(K=256, N=96, rank=32, group_w=32, group_a=32, bits_a=4),
    "row_groups": dict(K=384, N=64, rank=64, group_w=64, group_a=0),
    "odd": dict(K=200, N=77, rank=70, group_w=64, group_a=32),
    "rank0": dict(K=130, N=40, rank=0, group_w=32, group_a=64),
    # generic path: 8-bit weights, small blocks
    "w8": dict(K=256, N=48, rank=32, group_w=32, group_a=32, bits_w=8),
    "block16": dict(K=100, N=30, rank=10, group_w=16, group_a=16),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M", [1, 7, 64, 300])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_op_on_cuda_matches_reference(name, M, dtype):
    p = dict(LAYOUTS[name])
    K, N = p.pop("K"), p.pop("N")
    case = random_case(K, N, p.pop("rank"), p.pop("group_w"), p.pop("group_a"), seed=M,
                       act_scale=M % 2 == 1, act_perm=np.int64 if M > 1 else np.int32,
                       bias=M != 7, **p)
    A = np.random.default_rng(M + K).standard_normal((M, K)).astype(dtype)
    y = _cuda_session(make_model(case, ["M", K], dtype)).run(None, {"A": A})[0]
    assert y.dtype == dtype
    check(case, A, y, OUT[np.dtype(dtype)])


def test_activation_codes_on_cuda():
    """Weights that pick single channels: any activation code that differs from the reference
    shows up as a whole quantization step."""
    case = codes_case(256, 300, 64, 32, 32, bits_a=4, ext=True)
    A = np.random.default_rng(4).standard_normal((37, 256)).astype(np.float32)
    y = _cuda_session(make_model(case, ["M", 256])).run(None, {"A": A})[0]
    check(case, A, y, "float32")


def test_fed_weights_on_cuda():
    fed = ("B", "scales", "wsum", "act_perm", "bias")
    case = random_case(256, 64, 64, 64, 64, seed=2, act_perm=np.int64, bias=True)
    A = np.random.default_rng(5).standard_normal((9, 256)).astype(np.float32)
    s = _cuda_session(make_model(case, ["M", 256], fed=fed))
    check(case, A, s.run(None, feeds(case, A, fed))[0], "float32")


def test_bad_fed_weights_are_an_error_on_cuda():
    fed = ("B", "scales", "wsum")
    case = random_case(128, 32, 32, 32, 32, seed=3)
    A = np.ones((2, 128), np.float32)
    s = _cuda_session(make_model(case, ["M", 128], fed=fed))
    bad = feeds(case, A, fed)
    bad["wsum"] = bad["wsum"] + 1
    with pytest.raises(Exception, match="wsum"):
        s.run(None, bad)


def test_cuda_graph_capture():
    case = random_case(512, 256, 128, 128, 128, seed=6, act_scale=True, act_perm=np.int64,
                       bias=True)
    model = make_model(case, [16, 512], np.float16)
    s = _cuda_session(model, {"enable_cuda_graph": "1"})
    rng = np.random.default_rng(7)
    A0 = rng.standard_normal((16, 512)).astype(np.float16)
    a_dev = ort.OrtValue.ortvalue_from_numpy(A0, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([16, 256], np.float16, "cuda", 0)
    io = s.io_binding()
    io.bind_ortvalue_input("A", a_dev)
    io.bind_ortvalue_output("Y", y_dev)
    for i in range(4):  # warm-up run(s), the capture, then replays of the captured graph
        A = A0 if i == 0 else rng.standard_normal((16, 512)).astype(np.float16)
        a_dev.update_inplace(A)
        s.run_with_iobinding(io)
        check(case, A, y_dev.numpy(), "float16")


def test_tiny_llama_cuda_matches_cpu(tiny_llama, tmp_path, capfd, monkeypatch):
    """A converted tiny Llama (w4a8) on CUDA against the same model on the CPU kernel: logits
    within 1e-3 relative RMS (the kernels' float32 sums differ in order from the CPU's exact
    integer ones, and a code at a rounding tie may flip downstream), same top-1 tokens."""
    from serq_onnx import compare
    from serq_onnx.converter import convert

    vocab = json.loads((tiny_llama.hf_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(1)
    calib = [rng.integers(0, vocab, size=64, dtype=np.int64) for _ in range(4)]
    ids = rng.integers(0, vocab, size=48, dtype=np.int64)
    convert(tiny_llama.onnx_path, tmp_path / "m", scheme="w4a8", calib_ids=calib, rank=32,
            group_w=32, group_a=32, progress=False, log=lambda *a: None)
    path = tmp_path / "m" / "model.onnx"
    cpu = compare.logits(serq_onnx.session(path), ids)
    monkeypatch.setenv("SERQ_ONNX_VERBOSE", "1")
    capfd.readouterr()
    gpu_session = serq_onnx.session(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    created = capfd.readouterr().err.count("SerqMatMul CUDA:")
    import onnx

    n_nodes = sum(n.op_type == "SerqMatMul" for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert created == n_nodes > 0  # every SerqMatMul got the CUDA kernel
    gpu = compare.logits(gpu_session, ids)
    d = compare.diff(gpu, cpu)
    assert d.rel_rms < 1e-3, d
    assert d.top1_agree >= 0.98, d
