"""Host side of the CUDA kernel of SerqMatMul, on the CPU machine.

A probe (``custom_ops/src/cuda/probe``) is built with g++ from the library's own plan, repack and
launcher sources and the tables generated from the AOT build of the current ``kernels/``; its
CUDA driver is a recording stand-in. Checked against the Python side: the launch plan of
``kernels/launch.py`` (variants, grids, every argument, scratch sizes, shape class and split-K,
on many shapes and every arch), the weight repack of ``kernels/repack.py``, the cubins (byte for
byte the AOT build's) and the choice of arch by compute capability.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serq_onnx import reference as ref

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "custom_ops" / "src"

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
if shutil.which("g++") is None:
    pytest.skip("g++ is needed to build the CUDA host-logic probe", allow_module_level=True)

from serq_onnx.kernels import configs, launch, plan  # noqa: E402
from serq_onnx.kernels.layout import KernelLayout  # noqa: E402
from serq_onnx.kernels.repack import repack_fast  # noqa: E402


def _cache_dir() -> Path:
    return Path(os.environ.get("SERQ_CACHE") or ROOT / ".cache")


@pytest.fixture(scope="module")
def aot_build(tmp_path_factory) -> Path:
    """The AOT build of the current kernels/ (scripts/aot_cached.py: the library build's cache)."""
    out = tmp_path_factory.mktemp("aot") / "aot"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_cached.py"), "--root", str(ROOT),
                        "--cache", str(_cache_dir()), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def manifest(aot_build) -> dict:
    return json.loads((aot_build / "manifest.json").read_text())


@pytest.fixture(scope="module")
def probe(aot_build, tmp_path_factory) -> Path:
    gen = tmp_path_factory.mktemp("gen")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cuda_embed.py"), "--manifest",
                        str(aot_build / "manifest.json"), "--out", str(gen)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cuda_inc = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    exe = gen / "serq_cuda_probe"
    sources = [SRC / "cuda" / "probe" / "serq_cuda_probe.cc", SRC / "cuda" / "plan.cc",
               SRC / "cuda" / "repack.cc", SRC / "cuda" / "launcher.cc", SRC / "cuda" / "driver.cc",
               SRC / "serq_layout.cc", gen / "serq_cuda_tables.cc", gen / "serq_cuda_cubins.S"]
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{SRC}",
                        "-isystem", str(cuda_inc), "-o", str(exe), *map(str, sources), "-ldl"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return exe


def _run(probe: Path, *args: str, stdin: str | None = None) -> list[dict]:
    r = subprocess.run([str(probe), *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


# --------------------------------------------------------------------------- cubins


def test_embedded_cubins_are_the_aot_build(probe, aot_build, manifest, tmp_path):
    info = _run(probe, "dump", str(tmp_path / "dump"))[0]
    assert info["entries"] == len(manifest["kernels"]) and info["archs"] == manifest["archs"]
    for e in manifest["kernels"]:
        got = (tmp_path / "dump" / f"sm_{e['arch']}" / f"{e['name']}.cubin").read_bytes()
        assert got == (aot_build / e["cubin"]).read_bytes(), e["name"]
    dumped = sorted(p.relative_to(tmp_path / "dump") for p in (tmp_path / "dump").rglob("*.cubin"))
    assert dumped == sorted(Path(e["cubin"]) for e in manifest["kernels"])


def _expected_arch(manifest: dict, major: int, minor: int) -> int:
    """The documented rule: same major, minor <= the device's, ``sm_XYa`` only on X.Y."""
    best = 0
    for e in manifest["kernels"]:
        a = e["arch"]
        exact = (e["ptx_target"] or "").endswith("a")
        if a // 10 == major and (a % 10 == minor if exact else a % 10 <= minor):
            best = max(best, a)
    return best


@pytest.mark.parametrize("cc,want", [((8, 0), 80), ((8, 6), 80), ((8, 7), 80), ((8, 9), 89),
                                     ((9, 0), 90), ((7, 5), 0), ((10, 0), 0), ((12, 0), 0)])
def test_arch_choice(probe, manifest, cc, want):
    got = _run(probe, "arch", str(cc[0]), str(cc[1]))[0]
    assert got["arch"] == want == _expected_arch(manifest, *cc)
    if not want:
        assert f"compute capability {cc[0]}.{cc[1]}" in got["why"] and "sm_80" in got["why"]


# --------------------------------------------------------------------------- repack


@pytest.mark.parametrize("K,N,rank,group_w,group_a", [
    (256, 64, 128, 128, 128), (96, 40, 32, 32, 32), (200, 24, 70, 64, 0), (130, 17, 0, 32, 64),
    (64, 8, 64, 64, 128), (1000, 33, 100, 128, 32)])
def test_repack_matches_python(probe, tmp_path, K, N, rank, group_w, group_a):
    L = ref.Layout(K=K, N=N, rank=rank, group_w=group_w, group_a=group_a)
    assert KernelLayout(L).path == "fast"
    rng = np.random.default_rng(K * N + rank)
    B = rng.integers(0, 256, size=(N, L.K_ext // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 2.0, size=(N, L.K_ext // group_w)).astype(np.float32)
    B.tofile(tmp_path / "B.bin")
    scales.tofile(tmp_path / "s.bin")
    _run(probe, "repack", str(K), str(N), str(rank), str(group_w), str(group_a),
         str(tmp_path / "B.bin"), str(tmp_path / "s.bin"), str(tmp_path / "out"))
    fw = repack_fast(B, scales, L)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.Bp", np.int8), fw.Bp.ravel())
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.sw", np.float32), fw.sw.ravel())
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.ws", np.int32), fw.ws.ravel())


# --------------------------------------------------------------------------- launch plans

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ARCH_CC = {80: (8, 0), 89: (8, 9), 90: (9, 0)}


def _cases() -> list[tuple]:
    """(M, K, N, rank, group_w, group_a, bits_w, bits_a, dtype, perm, has_scale, has_bias, arch)."""
    layouts = [
        (4096, 4096, 128, 128, 128, 4, 8), (4096, 14336, 128, 128, 128, 4, 8),
        (14336, 4096, 128, 128, 32, 4, 4), (4096, 1024, 128, 128, 0, 4, 8),
        (96, 200, 32, 32, 32, 4, 4), (130, 70, 17, 64, 0, 4, 8), (200, 33, 0, 32, 64, 4, 8),
        (64, 8, 64, 64, 128, 4, 8), (3000, 40, 100, 128, 0, 4, 8), (256, 48, 64, 64, 32, 4, 4),
        # generic path: 8-bit weights, blocks not a multiple of 32
        (256, 64, 32, 32, 32, 8, 8), (100, 30, 10, 16, 16, 4, 8), (90, 20, 6, 6, 2, 4, 4),
        (300, 50, 60, 20, 40, 8, 4),
    ]
    # both sides of every shape-class bound, and prefill sizes
    bounds = [c.m_max for c in configs.GEMM_CONFIGS if c.m_max]
    ms = sorted({1, 2, 7, 300, 2048, *bounds, *(b + 1 for b in bounds)})
    flags = [("fp32", "none", 0, 0), ("fp16", "i64", 1, 1), ("fp16", "i32", 0, 1),
             ("fp32", "i32", 1, 0)]
    out = []
    for i, lay in enumerate(layouts):
        for j, M in enumerate(ms):
            if lay[1] * M > 2**24 and M > 64:  # keep the Python side's buffers small
                continue
            dtype, perm, sc, bi = flags[(i + j) % len(flags)]
            arch = (80, 89, 90)[(i + 2 * j) % 3]
            out.append((M, *lay, dtype, perm, sc, bi, arch))
    return out


CASES = _cases()


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, v, grid, kwargs):
        self.calls.append((v.name, tuple(int(g) for g in grid), dict(kwargs)))


def _python_plan(case):
    """Run kernels/launch.py serq_matmul with a recording runner (nothing executes)."""
    M, K, N, rank, gw, ga, bw, ba, dtype, perm, sc, bi, _arch = case
    L = ref.Layout(K=K, N=N, rank=rank, group_w=gw, group_a=ga, bits_w=bw, bits_a=ba)
    kl = KernelLayout(L)
    if kl.path == "fast":
        t = {"Bp": torch.empty(N, kl.KX // 2, dtype=torch.int8),
             "sw": torch.empty(kl.n_units, N, dtype=torch.float32),
             "ws": torch.empty(kl.n_units, N, dtype=torch.int32)}
    else:
        t = {"B": torch.empty(N, L.K_ext // 2 if bw == 4 else L.K_ext,
                              dtype=torch.uint8 if bw == 4 else torch.int8),
             "scales": torch.empty(N, L.K_ext // gw, dtype=torch.float32)}
    bias = torch.empty(N, dtype=torch.float32) if bi else None
    dw = launch.DeviceWeights(kl, t, bias)
    A = torch.empty(M, K, dtype=TORCH_DTYPES[dtype])
    act_scale = torch.empty(K, dtype=torch.float32) if sc else None
    act_perm = None if perm == "none" else torch.empty(K, dtype=getattr(torch, f"int{perm[1:]}"))
    rec = _Recorder()
    Y = launch.serq_matmul(A, dw, act_scale, act_perm, runner=rec)
    known = {A.data_ptr(): "A", Y.data_ptr(): "Y", **{v.data_ptr(): k for k, v in t.items()}}
    for name, x in (("act_scale", act_scale), ("act_perm", act_perm), ("bias", bias)):
        if x is not None:
            known[x.data_ptr()] = name
    return rec.calls, known, kl


SCRATCH_TORCH = {"int8": torch.int8, "int32": torch.int32, "float32": torch.float32}


def _compare(case, got: dict, manifest: dict) -> None:
    M, K, N, rank, gw, ga, bw, ba, dtype, perm, sc, bi, arch = case
    calls, known, kl = _python_plan(case)
    assert got["arch"] == arch and got["path"] == kl.path
    names = launch.quantities(kl, M, has_perm=perm != "none", has_scale=bool(sc), has_bias=bool(bi))
    for k in ("KX", "unit", "n_units", "n_pairs", "n_groups", "qmax", "off", "ldp", "n_split",
              "pairs_per_split"):
        assert got["q"][k] == names[k], k
    assert got["gemm_class"] == names["gemm_class"]
    scratch_spec = manifest["plan"]["scratch"]
    assert got["scratch"] == {k: plan.evaluate(s["count"], names) for k, s in scratch_spec.items()}
    entries = {(e["name"], e["arch"]): e for e in manifest["kernels"]}
    absent = {"act_perm": perm == "none", "act_scale": not sc, "bias": not bi}

    assert [s["variant"] for s in got["steps"]] == [c[0] for c in calls]
    assert len(got["launches"]) == len(calls)
    inner: dict[int, str] = {}  # Python's own buffers (scratch, dummies) -> the C++ buffer
    for step, launch_rec, (vname, grid, kwargs) in zip(got["steps"], got["launches"], calls):
        e = entries[(vname, arch)]
        assert [a[0] for a in step["args"]] == [a["name"] for a in e["args"]]
        for (pname, val), a in zip(step["args"], e["args"]):
            want = kwargs.get(pname, 0)
            if not a["type"].startswith("*"):
                assert val == int(want), (vname, pname)
                continue
            if not hasattr(want, "data_ptr"):
                assert val == int(want) == 0, (vname, pname)
                continue
            ptr = want.data_ptr()
            if ptr in known:
                assert val == known[ptr], (vname, pname)
            elif val in absent:  # an optional input the node lacks: Python passes a dummy
                assert absent[val] and want.numel() == 1, (vname, pname)
            else:  # scratch: same buffer wherever Python uses the same one, same type and size
                assert inner.setdefault(ptr, val) == val, (vname, pname)
                assert want.dtype == SCRATCH_TORCH[scratch_spec[val]["dtype"]]
                assert want.numel() == max(got["scratch"][val], 1)
        # What reached cuLaunchKernel: the manifest's function and launch shape, the plan's
        # values in its slots (buffers at the addresses the probe gave them).
        assert launch_rec["name"] == vname and launch_rec["arch"] == arch
        assert launch_rec["symbol"] == e["symbol"]
        assert tuple(launch_rec["grid"]) == grid
        assert launch_rec["block"] == [e["threads"], 1, 1] and launch_rec["shared"] == e["shared"]
        assert launch_rec["extra"] == 0 and launch_rec["stream"] == 0x5EED
        assert launch_rec["cubin_size"] == (Path(manifest["_dir"]) / e["cubin"]).stat().st_size
        for (pname, val), raw in zip(step["args"], launch_rec["params"]):
            assert raw == (got["buffers"][val] if isinstance(val, str) else val), (vname, pname)
    assert set(inner.values()) <= set(scratch_spec)


def test_plans_match_python_launcher(probe, manifest, aot_build):
    manifest = {**manifest, "_dir": str(aot_build)}
    lines = "\n".join(" ".join(map(str, c[:12])) + " " + " ".join(map(str, ARCH_CC[c[12]]))
                      for c in CASES)
    got = _run(probe, "plan", stdin=lines + "\n")
    assert len(got) == len(CASES)
    classes = set()
    for case, g in zip(CASES, got):
        assert "error" not in g, (case, g.get("error"))
        _compare(case, g, manifest)
        classes.add((g["path"], g["gemm_class"], g["q"]["n_split"] > 1, g["arch"]))
    # The cases reach every shape class, split-K and not, both paths, every arch.
    assert {c[1] for c in classes if c[0] == "fast"} == {c["name"] for c in manifest["gemm_configs"]}
    assert {c[2] for c in classes} == {True, False} and {c[0] for c in classes} == {"fast", "generic"}
    assert {c[3] for c in classes} == set(manifest["archs"])
    # Cubins above 48 KiB of dynamic shared memory launched too: the stand-in driver, like the
    # real one, refuses them unless the function attribute was raised first.
    big = {e["name"] for e in manifest["kernels"] if e["shared"] > 48 * 1024}
    if big:
        assert any(lr["name"] in big for g in got for lr in g["launches"])


@pytest.mark.parametrize("line,pattern", [
    # i32 indexing: a buffer over 2^31 elements is refused, not launched
    ("600000 4096 4096 128 128 128 4 8 fp16 none 0 0 9 0", "exceed 2\\^31"),
    ("1 64 64 0 32 32 4 8 fp32 none 0 0 7 5", "no cubin of this library runs on compute capability 7.5"),
    # act_quant's grid y is n_groups: at most 65535
    ("1 262144 8 0 2 2 4 8 fp32 none 0 0 9 0", "launch grid"),
])
def test_unlaunchable_shapes_are_errors(probe, line, pattern):
    import re

    got = _run(probe, "plan", stdin=line + "\n")[0]
    assert "error" in got and re.search(pattern, got["error"]), got
    assert got["error"].startswith("SerqMatMul: ")
