"""Python launcher of the kernels on torch tensors: executes :mod:`.plan` with the variants of
:mod:`.aot` (same constexprs, warps, stages, argument expressions and grids as the manifest the
C++ launcher reads). The tests run it on CPU tensors under ``TRITON_INTERPRET=1`` and on CUDA
tensors on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from serq_onnx import reference as ref

from . import aot, configs, plan
from .layout import KernelLayout, param_stride
from .repack import repack_fast

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Runs one step: (variant, grid, keyword arguments by parameter name).
Runner = Callable[["aot.Variant", tuple, dict], None]


def jit_runner(v: aot.Variant, grid: tuple, kwargs: dict) -> None:
    """Launch through Triton's JIT (or its interpreter) with the variant's compile options."""
    aot._kernel(v.kernel)[grid](**kwargs, **v.constexprs, num_warps=v.num_warps,
                                num_stages=v.num_stages)


@dataclass
class DeviceWeights:
    """A SerqMatMul's constant inputs on a device, in the layout its path reads."""

    klayout: KernelLayout
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: torch.Tensor | None = None


def prepare_weights(B: np.ndarray, scales: np.ndarray, layout: ref.Layout,
                    bias: np.ndarray | None = None, device: str | torch.device = "cpu"
                    ) -> DeviceWeights:
    """Repack (fast path) or copy (generic path) the initializers onto ``device``, once."""
    kl = KernelLayout(layout)
    if kl.path == "fast":
        fw = repack_fast(B, scales, layout)
        t = {"Bp": fw.Bp, "sw": fw.sw, "ws": fw.ws}
    else:
        codes = np.ascontiguousarray(B)
        t = {"B": codes.view(np.int8) if layout.bits_w == 8 else codes,
             "scales": np.ascontiguousarray(scales, dtype=np.float32)}
    dev = torch.device(device)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in t.items()}
    b = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32)).to(dev)
    return DeviceWeights(kl, t, b)


def quantities(kl: KernelLayout, M: int, *, has_perm: bool, has_scale: bool, has_bias: bool,
               config: configs.GemmConfig | None = None, n_split: int | None = None
               ) -> dict[str, Any]:
    """Every size and flag the plan's expressions name, for ``M`` rows."""
    L = kl.layout
    q = dict(M=M, N=L.N, K=L.K, rank=L.rank, K_pad=L.K_pad, r_pad=L.r_pad, K_ext=L.K_ext,
             group_w=L.group_w, block=L.block, bits_w=L.bits_w, KX=kl.KX, unit=kl.unit,
             n_units=kl.n_units, n_pairs=kl.n_pairs, group_a_eff=kl.group_a_eff,
             n_groups=kl.n_groups, qmax=kl.qmax, off=kl.code_offset, ldp=param_stride(M),
             has_perm=int(has_perm), has_scale=int(has_scale), has_bias=int(has_bias),
             n_split=1, pairs_per_split=max(kl.n_pairs, 1), gemm_class="")
    if kl.path == "fast":
        cfg = config or configs.gemm_config(M)
        if n_split is None:
            n, per = configs.split_k(cfg, M, L.N, kl.n_pairs)
        else:
            per = plan.cdiv(kl.n_pairs, n_split)
            n = plan.cdiv(kl.n_pairs, per)
        q.update(n_split=n, pairs_per_split=per, gemm_class=cfg.name)
    return q


def serq_matmul(A: torch.Tensor, dw: DeviceWeights, act_scale: torch.Tensor | None = None,
                act_perm: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                config: configs.GemmConfig | None = None, n_split: int | None = None,
                runner: Runner = jit_runner) -> torch.Tensor:
    """``reference.serq_matmul`` on the kernels: ``A [..., K]`` -> ``Y [..., N]``.

    ``config`` / ``n_split`` override the shape class and split-K factor (tests); ``runner``
    launches each step (default: Triton's JIT; :class:`.cubin_launch.CubinRunner`: the AOT
    cubins through the CUDA driver, as the C++ launcher does)."""
    kl = dw.klayout
    L = kl.layout
    lead = A.shape[:-1]
    x = A.reshape(-1, L.K).contiguous()
    M = x.shape[0]
    dev = x.device
    y_dtype = out_dtype or A.dtype
    names = quantities(kl, M, has_perm=act_perm is not None, has_scale=act_scale is not None,
                       has_bias=dw.bias is not None, config=config, n_split=n_split)
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    tdt = {"int8": torch.int8, "int32": torch.int32, "float32": torch.float32}
    bufs: dict[str, Any] = {
        "A": x, "Y": torch.empty((M, L.N), dtype=y_dtype, device=dev),
        "act_perm": act_perm if act_perm is not None else dummy,
        "act_scale": act_scale if act_scale is not None else dummy.float(),
        "bias": dw.bias if dw.bias is not None else dummy.float(), **dw.tensors,
    }
    for name, (dt, count) in plan.SCRATCH.items():
        bufs[name] = torch.empty(max(plan.evaluate(count, names), 1), dtype=tdt[dt], device=dev)
    tags = dict(a_dtype=DTYPE_NAMES[x.dtype], y_dtype=DTYPE_NAMES[y_dtype],
                perm_dtype="i64" if act_perm is not None and act_perm.dtype == torch.int64
                else "i32",
                part_dtype="fp32" if names["n_split"] > 1 else DTYPE_NAMES[y_dtype],
                gemm_class=names["gemm_class"], unit=kl.unit, bits_w=L.bits_w,
                quant_ch=configs.quant_chunk(kl.group_a_eff))
    variants = aot.variants_by_name()
    for _step, kernel, vname, args, when in plan.STEPS[kl.path]:
        if not plan.evaluate(when, names):
            continue
        v = variants[vname.format(**tags)]
        kwargs = {p: plan.evaluate(e, {**names, **bufs}) for p, e in args.items()}
        grid = tuple(plan.evaluate(g, {**names, **v.constexprs}) for g in plan.GRIDS[kernel])
        runner(v, grid, kwargs)
    return bufs["Y"].reshape(*lead, L.N)


def quantize(x: torch.Tensor, kl: KernelLayout, act_scale: torch.Tensor | None = None,
             act_perm: torch.Tensor | None = None, runner: Runner = jit_runner):
    """Only the plan's quantization step on ``x: [M, K]``; returns ``(q, sa, za, ldp)`` as
    ``[M, KX]``, ``[n_units, ldp]`` x 2 views (for the tests of the codes)."""
    M = x.shape[0]
    names = quantities(kl, M, has_perm=act_perm is not None, has_scale=act_scale is not None,
                       has_bias=False)
    dev = x.device
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    ldp = names["ldp"]
    bufs = {"A": x.contiguous(), "act_perm": act_perm if act_perm is not None else dummy,
            "act_scale": act_scale if act_scale is not None else dummy.float(),
            "q": torch.empty((M, kl.KX), dtype=torch.int8, device=dev),
            "sa": torch.empty((kl.n_units, ldp), dtype=torch.float32, device=dev),
            "za": torch.empty((kl.n_units, ldp), dtype=torch.int32, device=dev)}
    perm = "i64" if act_perm is not None and act_perm.dtype == torch.int64 else "i32"
    ch = configs.quant_chunk(kl.group_a_eff)
    v = aot.variants_by_name()[f"act_quant_{DTYPE_NAMES[x.dtype]}_perm{perm}_ch{ch}"]
    kwargs = {p: plan.evaluate(e, {**names, **bufs}) for p, e in plan.QUANT_ARGS.items()}
    if M:
        grid = tuple(plan.evaluate(g, {**names, **v.constexprs})
                     for g in plan.GRIDS["act_quant_kernel"])
        runner(v, grid, kwargs)
    return bufs["q"], bufs["sa"], bufs["za"], ldp
