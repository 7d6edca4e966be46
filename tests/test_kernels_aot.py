"""The ahead-of-time build: sm_80/89/90 cubins, their manifest, tensor cores and no spills.

The build runs once per session in a subprocess (``python -m serq_onnx.kernels.aot``, the
command the package build uses), without ``TRITON_INTERPRET``; a subset of variants keeps it
short: every kernel function, every GEMM shape class and unit, one output dtype.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

from serq_onnx.kernels import aot, configs, sass
from serq_onnx.kernels.layout import FAST_UNITS

# Triton itself is imported only inside the tests: importing it at collection, before
# test_kernels_interp sets TRITON_INTERPRET, would leave its standard library uninterpreted.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (pip install .[gpu])")

ARCHS = (80, 89, 90)
SUBSET = (r"^(act_quant_fp16_permi32_ch\d+|gemm_\w+_fp16|gemm_decode_\w+_fp32|splitk_reduce_fp16"
          r"|generic_w[48]_fp16)$")
HOT = ("act_quant_", "gemm_", "splitk_reduce_")

needs_cuobjdump = pytest.mark.skipif(
    sass.find_tool("cuobjdump") is None or sass.find_tool("nvdisasm") is None,
    reason="cuobjdump/nvdisasm not installed (pip install .[gpu])")


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "serq_onnx.kernels.aot", "--out", str(out), "--arch",
                    ",".join(map(str, ARCHS)), "--only", SUBSET], check=True, env=env,
                   capture_output=True, text=True, cwd=out)  # cwd: the installed package
    return out, json.loads((out / "manifest.json").read_text())


def _entries(manifest, prefix=""):
    return [e for e in manifest["kernels"] if e["name"].startswith(prefix)]


def test_variants_are_well_formed():
    """Unique names; every signature lists the kernel's parameters in order; 3 grid axes."""
    vs = aot.all_variants()
    assert len({v.name for v in vs}) == len(vs)
    n_gemm = len(configs.GEMM_CONFIGS) * len(FAST_UNITS) * len(aot.OUT_TYPES)
    assert len([v for v in vs if v.name.startswith("gemm_")]) == n_gemm
    for v in vs:
        fn = aot._kernel(v.kernel)
        params = list(inspect.signature(fn.fn).parameters)
        assert list(v.signature) == params, v.name
        assert set(v.constexprs) == {n for n, t in v.signature.items() if t == "constexpr"}
        assert set(v.aligned) <= set(v.signature) and len(v.grid) == 3


def test_manifest_describes_every_cubin(build):
    out, manifest = build
    subset = [v for v in aot.all_variants() if re.search(SUBSET, v.name)]
    assert manifest["version"] == aot.MANIFEST_VERSION and manifest["archs"] == list(ARCHS)
    assert len(manifest["kernels"]) == len(subset) * len(ARCHS)
    by_name = {v.name: v for v in subset}
    for e in manifest["kernels"]:
        blob = (out / e["cubin"]).read_bytes()
        assert blob[:4] == b"\x7fELF" and e["symbol"].encode() in blob
        v = by_name[e["name"]]
        runtime = [n for n, t in v.signature.items() if t != "constexpr"]
        # cuLaunchKernel order: the non-constexpr parameters, then Triton's two scratch pointers
        assert [a["name"] for a in e["args"]] == runtime + ["global_scratch", "profile_scratch"]
        assert e["global_scratch_size"] == 0 and e["profile_scratch_size"] == 0
        assert e["threads"] == 32 * v.num_warps and e["num_ctas"] == 1
        assert e["shared"] >= 0 and e["constexprs"] == v.constexprs
        assert e["ptx_target"] == ("sm_90a" if e["arch"] == 90 else f"sm_{e['arch']}")


@needs_cuobjdump
def test_sass_targets_each_arch(build):
    out, manifest = build
    for e in _entries(manifest, "gemm_decode_u128"):
        want = "sm_90a" if e["arch"] == 90 else f"sm_{e['arch']}"
        assert sass.sass_arch(sass.sass(out / e["cubin"])) == want


@needs_cuobjdump
def test_gemm_runs_on_int8_tensor_cores(build):
    """IMMA (mma.sync s8) on sm_80/89; on sm_90 IGMMA (wgmma) for 64-row tiles, IMMA for 16."""
    out, manifest = build
    gemms = _entries(manifest, "gemm_")
    assert len(gemms) == (len(configs.GEMM_CONFIGS) + 1) * len(FAST_UNITS) * len(ARCHS)
    for e in gemms:
        ops = sass.mma_instructions(sass.sass(out / e["cubin"]))
        kinds = {op.split(".")[0] for op in ops}
        if e["arch"] == 90 and e["constexprs"]["BM"] >= 64:
            assert kinds == {"IGMMA"}, (e["name"], ops)
        else:
            assert kinds == {"IMMA"}, (e["arch"], e["name"], ops)
            assert all(".S8.S8" in op for op in ops), ops


@needs_cuobjdump
def test_non_gemm_kernels_have_no_mma(build):
    out, manifest = build
    for e in _entries(manifest, "act_quant_") + _entries(manifest, "splitk_reduce_"):
        assert not sass.mma_instructions(sass.sass(out / e["cubin"])), e["name"]


@needs_cuobjdump
def test_hot_kernels_do_not_spill(build):
    """cuobjdump -res-usage: STACK 0 and LOCAL 0 (no register spills) in every hot kernel."""
    out, manifest = build
    seen = 0
    for e in manifest["kernels"]:
        if not e["name"].startswith(HOT):
            continue
        usage = sass.res_usage(out / e["cubin"])
        assert e["symbol"] in usage, usage
        u = usage[e["symbol"]]
        assert u["STACK"] == 0 and u.get("LOCAL", 0) == 0, (e["arch"], e["name"], u)
        assert 0 < u["REG"] <= 255
        seen += 1
    n_gemm = (len(configs.GEMM_CONFIGS) + 1) * len(FAST_UNITS)  # + the fp32 decode variants
    assert seen == (len(configs.QUANT_CHUNKS) + 1 + n_gemm) * len(ARCHS)


def test_build_refuses_interpreted_kernels(tmp_path):
    """Under TRITON_INTERPRET the decorated kernels cannot be compiled: a clear error."""
    code = ("from serq_onnx.kernels import aot\n"
            "aot.compile_variant(aot.quant_variants()[0], 80)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=tmp_path)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr


def test_plan_names_real_variants_and_arguments():
    """Every variant name the plan can produce exists, and every step's argument expressions
    cover exactly its kernel's runtime parameters (the order is the manifest's)."""
    from serq_onnx.kernels import plan

    names = aot.variants_by_name()
    dts = ("fp32", "fp16", "bf16")
    for path, steps in plan.STEPS.items():
        for _step, kernel, template, args, _when in steps:
            for a, y, p, cls, unit, bw, ch in itertools.product(
                    dts, dts, ("i32", "i64"), [c.name for c in configs.GEMM_CONFIGS],
                    FAST_UNITS, (4, 8), configs.QUANT_CHUNKS):
                part = "fp32" if cls == "decode" else y
                v = names[template.format(a_dtype=a, y_dtype=y, perm_dtype=p, gemm_class=cls,
                                          unit=unit, bits_w=bw, part_dtype=part, quant_ch=ch)]
                assert v.kernel.endswith(":" + kernel)
                runtime = [n for n, t in v.signature.items() if t != "constexpr"]
                assert sorted(args) == sorted(runtime), (path, kernel)
    m = plan.as_manifest()
    assert set(m["scratch"]) == {"q", "sa", "za", "part"}
    assert set(m["grids"]) == {s[1] for steps in plan.STEPS.values() for s in steps}


def test_manifest_carries_the_plan(build):
    _, manifest = build
    from serq_onnx.kernels import plan

    assert manifest["plan"] == json.loads(json.dumps(plan.as_manifest()))
    assert manifest["gemm_configs"] == [c.as_dict() for c in configs.GEMM_CONFIGS]
    for e in manifest["kernels"]:
        assert e["grid"] == plan.GRIDS[e["kernel"].split(":")[1]]


def test_driver_arguments_follow_the_manifest(build):
    """kernelParams for cuLaunchKernel: manifest order, pointers as 64-bit addresses, i32 as
    int32, the two Triton scratch pointers 0 (what CubinRunner and the C++ launcher pass)."""
    import ctypes

    from serq_onnx.kernels.cubin_launch import pack_args

    class FakeTensor:
        def __init__(self, p):
            self.p = p

        def data_ptr(self):
            return self.p

    _, manifest = build
    e = _entries(manifest, "gemm_prefill_u128")[0]
    values = {}
    for i, a in enumerate(e["args"][:-2]):
        values[a["name"]] = FakeTensor(0x7F0000000000 + 256 * i) if a["type"][0] == "*" else -i
    params, _keep = pack_args(e["args"], values)
    assert len(params) == len(e["args"])
    for i, a in enumerate(e["args"]):
        ty = ctypes.c_uint64 if a["type"][0] == "*" else ctypes.c_int32
        got = ctypes.cast(params[i], ctypes.POINTER(ty)).contents.value
        if a["name"] in ("global_scratch", "profile_scratch"):
            assert got == 0
        elif a["type"][0] == "*":
            assert got == 0x7F0000000000 + 256 * i
        else:
            assert got == -i
    with pytest.raises(ValueError):
        pack_args([{"name": "x", "type": "fp32"}], {"x": 1.0})
