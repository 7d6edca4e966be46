"""Python launchers of the kernels on torch tensors: the tests' entry point (CPU tensors under
``TRITON_INTERPRET=1``, CUDA tensors on a GPU) and the executable description of what the C++
launcher does with the AOT cubins -- same buffers, same argument order, same grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import triton

from serq_onnx import reference as ref

from . import configs
from .gemm import serq_gemm_kernel, splitk_reduce_kernel
from .generic import serq_generic_kernel
from .layout import KernelLayout, param_stride
from .quant import act_quant_kernel
from .repack import repack_fast


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
    dev = torch.device(device)
    if kl.path == "fast":
        fw = repack_fast(B, scales, layout)
        t = {"Bp": torch.from_numpy(fw.Bp), "sw": torch.from_numpy(fw.sw),
             "ws": torch.from_numpy(fw.ws)}
    else:
        codes = np.ascontiguousarray(B)
        if layout.bits_w == 8:
            codes = codes.view(np.int8)
        t = {"B": torch.from_numpy(codes), "scales": torch.from_numpy(np.ascontiguousarray(scales))}
    t = {k: v.to(dev) for k, v in t.items()}
    b = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32)).to(dev)
    return DeviceWeights(kl, t, b)


def quantize(x: torch.Tensor, kl: KernelLayout, act_scale: torch.Tensor | None = None,
             act_perm: torch.Tensor | None = None):
    """Launch :func:`.quant.act_quant_kernel` on ``x: [M, K]``; returns ``(q, sa, za, ldp)``."""
    L = kl.layout
    M = x.shape[0]
    ldp = param_stride(M)
    dev = x.device
    q = torch.empty((M, kl.KX), dtype=torch.int8, device=dev)
    sa = torch.empty((kl.n_units, ldp), dtype=torch.float32, device=dev)
    za = torch.empty((kl.n_units, ldp), dtype=torch.int32, device=dev)
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    perm = act_perm if act_perm is not None else dummy
    scl = act_scale if act_scale is not None else dummy.float()
    cfg = configs.QUANT_CONFIG
    if M:
        act_quant_kernel[(M,)](
            x, perm, scl, q, sa, za, L.K, x.stride(0), L.K_pad, L.rank, L.r_pad, L.K_ext, kl.KX,
            kl.group_a_eff, kl.n_groups, kl.unit, kl.n_units, ldp, kl.qmax, kl.code_offset,
            int(act_perm is not None), int(act_scale is not None),
            CH=cfg["CH"], num_warps=cfg["num_warps"])
    return q, sa, za, ldp


def gemm(q, sa, za, ldp: int, dw: DeviceWeights, M: int, out_dtype: torch.dtype,
         config: configs.GemmConfig | None = None, n_split: int | None = None) -> torch.Tensor:
    """The GEMM (fast or generic) on quantized activations; ``Y [M, N]`` in ``out_dtype``."""
    kl = dw.klayout
    L = kl.layout
    dev = q.device
    y = torch.empty((M, L.N), dtype=out_dtype, device=dev)
    if M == 0:
        return y
    bias = dw.bias if dw.bias is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    has_bias = int(dw.bias is not None)
    t = dw.tensors
    if kl.path == "generic":
        g = configs.GENERIC_CONFIG
        grid = (triton.cdiv(L.N, g["BN"]), triton.cdiv(M, g["BM"]))
        serq_generic_kernel[grid](
            q, t["B"], sa, za, t["scales"], bias, y, M, L.N, L.K_ext, kl.KX, t["B"].shape[1],
            t["scales"].shape[1], ldp, L.block, L.group_w, y.stride(0), has_bias,
            BM=g["BM"], BN=g["BN"], BK=g["BK"], BITS_W=L.bits_w, num_warps=g["num_warps"])
        return y
    cfg = config or configs.gemm_config(M)
    if n_split is None:
        n_split, per = configs.split_k(cfg, M, L.N, kl.n_pairs)
    else:
        per = -(-kl.n_pairs // n_split)
        n_split = -(-kl.n_pairs // per)
    grid = (triton.cdiv(L.N, cfg.BN), triton.cdiv(M, cfg.BM), n_split)
    common = (q, t["Bp"], sa, za, t["sw"], t["ws"])
    consts = dict(BM=cfg.BM, BN=cfg.BN, HALF=kl.half, UNITS_PER_PAIR=kl.units_per_pair,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if n_split == 1:
        serq_gemm_kernel[grid](*common, bias, y, M, L.N, kl.KX, kl.KX // 2, ldp, kl.n_pairs, per,
                               y.stride(0), 0, has_bias, **consts)
        return y
    part = torch.empty((n_split, M, L.N), dtype=torch.float32, device=dev)
    serq_gemm_kernel[grid](*common, bias, part, M, L.N, kl.KX, kl.KX // 2, ldp, kl.n_pairs, per,
                           L.N, M * L.N, 0, **consts)
    r = configs.REDUCE_CONFIG
    splitk_reduce_kernel[(triton.cdiv(M * L.N, r["BLOCK"]),)](
        part, bias, y, M * L.N, L.N, n_split, M * L.N, has_bias, BLOCK=r["BLOCK"],
        num_warps=r["num_warps"])
    return y


def serq_matmul(A: torch.Tensor, dw: DeviceWeights, act_scale: torch.Tensor | None = None,
                act_perm: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                config: configs.GemmConfig | None = None, n_split: int | None = None
                ) -> torch.Tensor:
    """``reference.serq_matmul`` on the kernels: ``A [..., K]`` -> ``Y [..., N]``."""
    L = dw.klayout.layout
    lead = A.shape[:-1]
    x = A.reshape(-1, L.K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q, sa, za, ldp = quantize(x, dw.klayout, act_scale, act_perm)
    y = gemm(q, sa, za, ldp, dw, x.shape[0], out_dtype or A.dtype, config, n_split)
    return y.reshape(*lead, L.N)
