"""Ahead-of-time build: every kernel variant compiled to cubins for sm_80/89/90, plus a manifest.

``python -m serq_onnx.kernels.aot --out DIR [--arch 80,89,90] [--only REGEX]`` (from an
installed package; from a source tree ``python -m kernels.aot``) writes
``DIR/sm_<cc>/<variant>.cubin`` and ``DIR/manifest.json``. No GPU is needed: Triton compiles
for a ``GPUTarget`` and its bundled ``ptxas`` assembles. sm_90 code is ``sm_90a`` (wgmma), which
loads on compute capability 9.0 only. Line info is left out (a third of the size).

``manifest.json`` (version :data:`MANIFEST_VERSION`), what the C++ launcher follows:

* ``kernels``: one entry per (variant, arch): ``name``, ``arch`` (cc, e.g. 89), ``cubin``
  (path relative to DIR, for ``cuModuleLoadData``), ``symbol`` (``cuModuleGetFunction``),
  ``args`` (``[{name, type}]``: the ``cuLaunchKernel`` parameter order -- the kernel's
  non-constexpr parameters as declared, then ``global_scratch`` and ``profile_scratch``, two
  pointers every Triton 3.x kernel takes; pass 0 for both: the build fails if a kernel would
  need either, ``global_scratch_size`` / ``profile_scratch_size`` are recorded as 0). Types:
  ``*fp32`` / ``*fp16`` / ``*bf16`` / ``*i8`` / ``*u8`` / ``*i32`` / ``*i64`` are device
  pointers (``CUdeviceptr``), ``i32`` is ``int32_t``. ``aligned16``: arguments compiled as
  divisible by 16 (pointers: 16-byte aligned; the launcher must check and refuse otherwise).
  ``threads`` (block ``threads x 1 x 1`` = 32 * ``num_warps``), ``shared`` (dynamic shared
  memory bytes of the launch; above 48 KiB set ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``
  first), ``num_ctas`` (1: no clusters), ``grid`` (three expressions over the plan's names and
  the entry's ``constexprs``), ``ptx_target``, ``triton`` (compiler version).
* ``plan`` (:mod:`.plan`): scratch buffers and their sizes, and per path (``fast`` /
  ``generic``, :mod:`.layout`) the steps in launch order with their variant-name template,
  argument expressions and launch condition.
* ``gemm_configs``, ``split_k``, ``fast_units``: the data the launcher needs to pick the shape
  class, the split-K factor (:func:`.configs.split_k`) and the unit of a layout.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import configs, plan
from .layout import FAST_UNITS

MANIFEST_VERSION = 1
ARCHS = (80, 89, 90)
OUT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass(frozen=True)
class Variant:
    """One compiled specialization of one kernel."""

    name: str
    kernel: str  # module:function
    signature: dict[str, str]  # every parameter in order: Triton type or "constexpr"
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]  # parameters assumed divisible by 16 (pointers: 16-byte aligned)
    num_warps: int
    num_stages: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> list[str]:
        """Grid rule per axis (:data:`.plan.GRIDS`, over the plan's names and the constexprs)."""
        return plan.GRIDS[self.kernel.split(":")[1]]

    def runtime_args(self) -> list[dict[str, str]]:
        return [{"name": n, "type": t} for n, t in self.signature.items() if t != "constexpr"]


def _kernel(ref: str) -> Callable:
    mod, fn = ref.split(":")
    module = __import__(f"{__package__}.{mod}", fromlist=[fn])
    return getattr(module, fn)


def _ptrs(sig: dict[str, str]) -> tuple[str, ...]:
    return tuple(n for n, t in sig.items() if t.startswith("*"))


def quant_variants() -> list[Variant]:
    out = []
    cfg = configs.QUANT_CONFIG
    for a_name, a_ty in (("fp32", "*fp32"), ("fp16", "*fp16"), ("bf16", "*bf16")):
        for (p_name, p_ty), ch in itertools.product((("i32", "*i32"), ("i64", "*i64")),
                                                    configs.QUANT_CHUNKS):
            sig = {"a_ptr": a_ty, "perm_ptr": p_ty, "ascale_ptr": "*fp32", "q_ptr": "*i8",
                   "sa_ptr": "*fp32", "za_ptr": "*i32"}
            sig |= {n: "i32" for n in ("K", "stride_am", "K_pad", "rank", "r_pad", "K_ext", "KX",
                                       "group", "n_groups", "unit", "n_units", "ldp", "qmax",
                                       "off", "has_perm", "has_scale")}
            sig["CH"] = "constexpr"
            out.append(Variant(
                f"act_quant_{a_name}_perm{p_name}_ch{ch}", "quant:act_quant_kernel", sig,
                {"CH": ch}, _ptrs(sig), cfg["num_warps"], cfg["num_stages"],
                # exact float32 rounding: no contraction into FMA anywhere in the quantizer
                {"enable_fp_fusion": False}))
    return out


def gemm_variants() -> list[Variant]:
    out = []
    for cfg in configs.GEMM_CONFIGS:
        for unit, (half, upp) in FAST_UNITS.items():
            for o_name, o_ty in OUT_TYPES.items():
                sig = {"q_ptr": "*i8", "w_ptr": "*i8", "sa_ptr": "*fp32", "za_ptr": "*i32",
                       "sw_ptr": "*fp32", "ws_ptr": "*i32", "bias_ptr": "*fp32", "y_ptr": o_ty}
                sig |= {n: "i32" for n in ("M", "N", "ldq", "ldw", "ldp", "n_pairs",
                                           "pairs_per_split", "stride_ym", "stride_ys",
                                           "has_bias")}
                sig |= {n: "constexpr" for n in ("BM", "BN", "HALF", "UNITS_PER_PAIR")}
                out.append(Variant(
                    f"gemm_{cfg.name}_u{unit}_{o_name}", "gemm:serq_gemm_kernel", sig,
                    {"BM": cfg.BM, "BN": cfg.BN, "HALF": half, "UNITS_PER_PAIR": upp},
                    _ptrs(sig) + ("ldq", "ldw"), cfg.num_warps, cfg.num_stages,
                    {"enable_fp_fusion": True}))
    return out


def reduce_variants() -> list[Variant]:
    cfg = configs.REDUCE_CONFIG
    out = []
    for o_name, o_ty in OUT_TYPES.items():
        sig = {"p_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": o_ty}
        sig |= {n: "i32" for n in ("MN", "N", "n_split", "stride_ps", "has_bias")}
        sig["BLOCK"] = "constexpr"
        out.append(Variant(f"splitk_reduce_{o_name}", "gemm:splitk_reduce_kernel", sig,
                           {"BLOCK": cfg["BLOCK"]}, _ptrs(sig), cfg["num_warps"],
                           cfg["num_stages"], {"enable_fp_fusion": True}))
    return out


def generic_variants() -> list[Variant]:
    g = configs.GENERIC_CONFIG
    out = []
    for bits_w, b_ty in ((4, "*u8"), (8, "*i8")):
        for o_name, o_ty in OUT_TYPES.items():
            sig = {"q_ptr": "*i8", "b_ptr": b_ty, "sa_ptr": "*fp32", "za_ptr": "*i32",
                   "sc_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": o_ty}
            sig |= {n: "i32" for n in ("M", "N", "K_ext", "ldq", "ldb", "lds", "ldp", "block",
                                       "group_w", "stride_ym", "has_bias")}
            sig |= {n: "constexpr" for n in ("BM", "BN", "BK", "BITS_W")}
            out.append(Variant(
                f"generic_w{bits_w}_{o_name}", "generic:serq_generic_kernel", sig,
                {"BM": g["BM"], "BN": g["BN"], "BK": g["BK"], "BITS_W": bits_w}, _ptrs(sig),
                g["num_warps"], g["num_stages"], {"enable_fp_fusion": True}))
    return out


def all_variants() -> list[Variant]:
    return quant_variants() + gemm_variants() + reduce_variants() + generic_variants()


@functools.cache
def variants_by_name() -> dict[str, Variant]:
    return {v.name: v for v in all_variants()}


def compile_variant(v: Variant, cc: int) -> tuple[bytes, dict[str, Any]]:
    """Compile ``v`` for compute capability ``cc``; returns the cubin and its launch metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(v.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{v.kernel} is not a JITFunction (TRITON_INTERPRET set?): "
                           "build in a process without the interpreter")
    names = list(v.signature)
    if names != list(fn.arg_names):
        raise ValueError(f"{v.name}: signature {names} != kernel parameters {fn.arg_names}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in v.aligned}
    src = ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options({"num_warps": v.num_warps, "num_stages": v.num_stages,
                                  **v.options})
    knobs = triton.knobs.compilation
    line_info_off = knobs.disable_line_info
    knobs.disable_line_info = True
    try:
        k = triton.compile(src, target=target, options=opts.__dict__)
    finally:
        knobs.disable_line_info = line_info_off
    md = k.metadata
    gs = int(getattr(md, "global_scratch_size", 0) or 0)
    ps = int(getattr(md, "profile_scratch_size", 0) or 0)
    if gs or ps:
        raise RuntimeError(f"{v.name} sm_{cc}: needs scratch (global {gs}, profile {ps}) bytes")
    ptx_target = re.search(r"^\.target\s+(\w+)", k.asm["ptx"], re.M)
    meta = {
        "symbol": md.name,
        "ptx_target": ptx_target.group(1) if ptx_target else None,
        "num_warps": md.num_warps,
        "threads": md.num_warps * 32,
        "num_ctas": md.num_ctas,
        "shared": md.shared,
        "global_scratch_size": gs,
        "profile_scratch_size": ps,
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "triton": triton.__version__,
    }
    return k.asm["cubin"], meta


def build(out: Path, archs=ARCHS, only: str | None = None, log=print) -> dict[str, Any]:
    """Compile every variant (matching ``only``) for ``archs`` into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in all_variants() if not only or re.search(only, v.name)]
    entries = []
    for cc in archs:
        (out / f"sm_{cc}").mkdir(exist_ok=True)
        for v in variants:
            t0 = time.perf_counter()
            cubin, meta = compile_variant(v, cc)
            rel = f"sm_{cc}/{v.name}.cubin"
            (out / rel).write_bytes(cubin)
            entries.append({
                "name": v.name, "arch": cc, "kernel": v.kernel, "cubin": rel, **meta,
                "args": v.runtime_args() + [{"name": "global_scratch", "type": "*i8"},
                                            {"name": "profile_scratch", "type": "*i8"}],
                "aligned16": list(v.aligned), "constexprs": v.constexprs,
                "num_stages": v.num_stages, "grid": v.grid,
            })
            log(f"sm_{cc} {v.name}: {time.perf_counter() - t0:.1f}s, shared {meta['shared']}")
    manifest = {
        "version": MANIFEST_VERSION,
        "archs": list(archs),
        "gemm_configs": [c.as_dict() for c in configs.GEMM_CONFIGS],
        "quant_chunks": {"chunks": list(configs.QUANT_CHUNKS),
                         "rule": "chunks[1] if group_a_eff >= chunks[1] else chunks[0]"},
        "split_k": {"target_programs": configs.SPLIT_TARGET_PROGRAMS,
                    "min_pairs_per_split": configs.MIN_PAIRS_PER_SPLIT},
        "fast_units": {str(u): {"half": h, "units_per_pair": p}
                       for u, (h, p) in FAST_UNITS.items()},
        "plan": plan.as_manifest(),
        "kernels": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)),
                    help="comma-separated compute capabilities (default: 80,89,90)")
    ap.add_argument("--only", default=None, help="regular expression on variant names")
    a = ap.parse_args(argv)
    build(a.out, tuple(int(x) for x in a.arch.split(",")), a.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
