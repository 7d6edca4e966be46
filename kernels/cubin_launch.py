"""Launch the AOT cubins through the CUDA driver API from Python (``ctypes``), exactly as the
manifest tells the C++ launcher to: ``cuModuleLoadData`` on the cubin bytes,
``cuModuleGetFunction`` on ``symbol``, the dynamic shared memory attribute when ``shared`` is
above 48 KiB, then ``cuLaunchKernel`` with the ``args`` in manifest order (the two Triton scratch
pointers last, as 0) on torch's current stream. A :class:`CubinRunner` plugs into
:func:`.launch.serq_matmul`, so the GPU tests check the shipped binaries and the manifest, not
only the Triton sources.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

CUDA_SUCCESS = 0
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEFAULT_SHARED_LIMIT = 48 * 1024


def pack_args(args: list[dict[str, str]], values: dict[str, Any]):
    """``kernelParams`` for ``cuLaunchKernel``: one ``void*`` per manifest argument, pointing at
    its value (``CUdeviceptr`` for pointer types -- tensors give ``data_ptr()``, absent ones 0 --
    ``int32_t`` for ``i32``). Returns the array and the storage it points into (keep both alive
    until the launch returns)."""
    store = []
    for a in args:
        val = values.get(a["name"], 0)
        if a["type"].startswith("*"):
            ptr = val.data_ptr() if hasattr(val, "data_ptr") else int(val)
            store.append(ctypes.c_uint64(ptr))
        elif a["type"] == "i32":
            store.append(ctypes.c_int32(int(val)))
        else:
            raise ValueError(f"unsupported argument type {a['type']!r} of {a['name']}")
    params = (ctypes.c_void_p * len(store))(*[ctypes.addressof(s) for s in store])
    return params, store


class CudaDriver:
    """The few driver entry points the launcher needs, from ``libcuda.so.1``."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        lib.cuInit.argtypes = [u]
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), vp]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
        lib.cuFuncSetAttribute.argtypes = [vp, ctypes.c_int, ctypes.c_int]
        lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, ctypes.POINTER(vp),
                                       ctypes.POINTER(vp)]
        self.lib = lib
        self.check(lib.cuInit(0), "cuInit")

    @staticmethod
    def check(rc: int, what: str) -> None:
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed: CUresult {rc}")


class CubinRunner:
    """Runs plan steps from the cubins of one arch in an AOT build directory."""

    def __init__(self, build_dir: Path, arch: int) -> None:
        self.dir = Path(build_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text())
        self.entries = {e["name"]: e for e in manifest["kernels"] if e["arch"] == arch}
        if not self.entries:
            raise ValueError(f"no sm_{arch} kernels in {build_dir}")
        self.driver = CudaDriver()
        self._functions: dict[str, ctypes.c_void_p] = {}
        self._images: dict[str, bytes] = {}

    def function(self, entry: dict[str, Any]) -> ctypes.c_void_p:
        name = entry["name"]
        if name not in self._functions:
            d = self.driver
            image = (self.dir / entry["cubin"]).read_bytes()
            mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
            d.check(d.lib.cuModuleLoadData(ctypes.byref(mod), image), "cuModuleLoadData")
            d.check(d.lib.cuModuleGetFunction(ctypes.byref(fn), mod, entry["symbol"].encode()),
                    "cuModuleGetFunction")
            if entry["shared"] > DEFAULT_SHARED_LIMIT:
                d.check(d.lib.cuFuncSetAttribute(
                    fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, entry["shared"]),
                    "cuFuncSetAttribute")
            self._images[name] = image
            self._functions[name] = fn
        return self._functions[name]

    def __call__(self, v, grid: tuple, kwargs: dict) -> None:
        import torch

        e = self.entries[v.name]
        params, _store = pack_args(e["args"], kwargs)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        gx, gy, gz = (int(g) for g in grid)
        self.driver.check(self.driver.lib.cuLaunchKernel(
            self.function(e), gx, gy, gz, e["threads"], 1, 1, e["shared"], stream, params, None),
            f"cuLaunchKernel({v.name})")
