"""The op library built with its CUDA part (SERQ_BUILD_CUDA=ON), on a machine without a GPU.

It exports only ``RegisterCustomOps``, links no CUDA library, never opens the driver unless a
CUDA kernel is created, embeds exactly the cubins of the AOT build, runs the CPU op (its tests
pass against it), and a session asking for ``CUDAExecutionProvider`` on a CPU-only onnxruntime
falls back to the CPU kernel with onnxruntime's warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

import serq_onnx  # noqa: E402
from op_models import make_model, random_case, reference64, tolerance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INDEX_NAME = "serq_cuda_cubins.json"


def _library() -> Path:
    try:
        return Path(serq_onnx.get_library_path())
    except serq_onnx.SerqError as e:
        pytest.skip(f"op library not built: {e}")


@pytest.fixture(scope="module")
def cuda_library() -> Path:
    lib = _library()
    if b"CUDAExecutionProvider" not in lib.read_bytes():
        pytest.skip(f"{lib} was built without its CUDA part (reinstall with SERQ_BUILD_CUDA=ON)")
    return lib


@pytest.fixture(scope="module")
def index(cuda_library) -> dict:
    path = cuda_library.parent / INDEX_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing: the library does not come from this package's install")
    return json.loads(path.read_text())


def test_exports_only_register_custom_ops_and_links_no_cuda(cuda_library):
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not installed")
    syms = subprocess.run(["nm", "-D", "--defined-only", str(cuda_library)], capture_output=True,
                          text=True, check=True).stdout.split()
    assert [s for s in syms if not all(c in "0123456789abcdef" for c in s) and len(s) > 1] == \
        ["RegisterCustomOps"]
    dyn = subprocess.run(["readelf", "-d", str(cuda_library)], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "cuda" in n.lower() or "nvrtc" in n.lower()], needed


# The child registers the library, runs the CPU op, and reports whether anything CUDA was mapped.
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import onnxruntime as ort
    import serq_onnx
    from op_models import make_model, random_case, reference64
    case = random_case(96, 24, 32, 32, 32, seed=3)
    A = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    s = serq_onnx.session(make_model(case, ["M", 96]))
    y = s.run(None, {"A": A})[0]
    maps = open("/proc/self/maps").read()
    print(json.dumps({"err": float(np.abs(y - reference64(case, A)).max()),
                      "mapped_cuda": sorted({l.split()[-1] for l in maps.splitlines()
                                             if "libcuda" in l or "libcudart" in l})}))
""")


def test_cpu_op_runs_without_opening_the_driver(cuda_library):
    """No libcuda is opened while registering the library and running the CPU kernel, whether
    or not this machine has one; here, without a driver at all, it must simply work."""
    env = {**os.environ, "SERQ_ONNX_LIBRARY": str(cuda_library)}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mapped_cuda"] == []
    assert out["err"] < 1e-3


def test_cpu_op_tests_pass_against_the_cuda_build(cuda_library):
    """tests/test_op_cpu.py, whole, against the library with its CUDA part."""
    env = {**os.environ, "SERQ_ONNX_LIBRARY": str(cuda_library)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(Path(__file__).parent / "test_op_cpu.py")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail, tail


def _aot_entry(index: dict) -> Path:
    """The AOT build the library was made from, in the build cache (scripts/aot_cached.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import aot_cached
    finally:
        sys.path.pop(0)
    cache = Path(os.environ.get("SERQ_CACHE") or ROOT / ".cache")
    return cache / "aot" / aot_cached.cache_key(ROOT, ",".join(map(str, index["archs"])))


def _skip_if_stale(index: dict, entry: Path) -> None:
    if index.get("aot_key") != entry.name:
        pytest.skip(f"the installed library was built from other kernels/ sources (key "
                    f"{index.get('aot_key')}, sources now {entry.name}): reinstall to test it")


def test_embedded_cubins_are_exactly_the_aot_build(cuda_library, index):
    pytest.importorskip("triton")
    entry = _aot_entry(index)
    _skip_if_stale(index, entry)
    assert (entry / "manifest.json").is_file(), f"the AOT build {entry} is not in the cache"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert sorted((c["name"], c["arch"]) for c in index["cubins"]) == \
        sorted((e["name"], e["arch"]) for e in manifest["kernels"])
    data = cuda_library.read_bytes()
    by_key = {(c["name"], c["arch"]): c for c in index["cubins"]}
    import hashlib

    for e in manifest["kernels"]:
        cubin = (entry / e["cubin"]).read_bytes()
        assert by_key[(e["name"], e["arch"])]["sha256"] == hashlib.sha256(cubin).hexdigest()
        assert data.find(cubin) >= 0, f"{e['cubin']} is not in {cuda_library.name}"


def test_cubins_equal_a_fresh_compile(cuda_library, index, tmp_path):
    """Two variants compiled again now by the AOT build (not from this project's cache) are byte
    for byte what the library embeds, for sm_80 and sm_90: an activation quantization and a GEMM."""
    pytest.importorskip("triton")
    _skip_if_stale(index, _aot_entry(index))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--out", str(tmp_path), "--arch", "80,90",
                        "--only", "^(act_quant_fp16_permi32_ch128|gemm_decode_u128_fp16)$"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cubins = sorted(tmp_path.rglob("*.cubin"))
    assert len(cubins) == 4
    data = cuda_library.read_bytes()
    for c in cubins:
        assert data.find(c.read_bytes()) >= 0, f"fresh {c.parent.name}/{c.name} differs from the embedded one"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_provider_falls_back_to_cpu(cuda_library, dtype):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the fallback is not exercised")
    case = random_case(160, 48, 32, 32, 32, seed=5, act_scale=True, act_perm=np.int64, bias=True)
    A = np.random.default_rng(1).standard_normal((3, 7, 160)).astype(dtype)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        s = serq_onnx.session(make_model(case, [3, 7, 160], dtype),
                              providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]
    y = s.run(None, {"A": A})[0]
    assert y.dtype == dtype and y.shape == (3, 7, 48)
    err = np.abs(y.astype(np.float64) - reference64(case, A))
    assert (err <= tolerance(case, A, dtype)).all(), err.max()


def test_cuda_build_without_triton_fails_clearly(tmp_path):
    """Asked for the CUDA part without what it needs, the build stops with the reason instead
    of producing a library without it."""
    cmake = shutil.which("cmake") or str(Path(sys.executable).with_name("cmake"))
    ort_inc = os.environ.get("ORT_INCLUDE_DIR") or (
        (ROOT / ".cache" / "ort-include").read_text().strip()
        if (ROOT / ".cache" / "ort-include").is_file() else "")
    if not Path(cmake).exists() or not ort_inc:
        pytest.skip("cmake or the onnxruntime headers (.cache/ort-include) not available")
    no_triton = tmp_path / "python-without-triton"
    no_triton.write_text("#!/bin/sh\necho 'ModuleNotFoundError: triton' >&2\nexit 1\n")
    no_triton.chmod(0o755)
    r = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "b"), "-DSERQ_BUILD_CUDA=ON",
                        f"-DORT_INCLUDE_DIR={ort_inc}", f"-DPython_EXECUTABLE={no_triton}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "SERQ_BUILD_CUDA=ON needs triton" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "b" / "build.ninja").exists() and not (tmp_path / "b" / "Makefile").exists()
