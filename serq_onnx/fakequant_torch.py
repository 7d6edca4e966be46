"""SERQ as PyTorch fake quantization of a Hugging Face Llama-family model.

This is the second, independent implementation of the method (ARCHITECTURE.md section 1): it
works on the PyTorch module tree rather than the ONNX graph and shares no code with the converter
or with ``serq_onnx.reference``, so a converted ONNX model matching these logits is evidence that
both got the method right rather than the same bug twice.

Every quantizer is "fake": codes are computed exactly as the op defines them (float32, rounding
half to even, activation range containing 0, scale 1 when the range is 0, partial last groups
computed over their real elements) and immediately dequantized back to float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "TARGETS",
    "SerqFakeQuantLinear",
    "SerqLayerWeights",
    "apply_serq_fakequant",
    "build_layer_weights",
    "calibrate_absmax",
    "calibrate_absmean",
    "calibrate_hessians",
    "fake_quant_activations",
    "fake_quant_weight",
    "fakequant_logits",
    "floor_scales",
    "gptq_quantize_weight",
    "layer_input_hessian",
    "lowrank_error_factors",
    "quantize_activations",
    "quantize_weight",
    "smoothquant_scales",
]

# The linear layers of a Llama decoder block that SERQ replaces (lm_head and embeddings stay
# float). Other families name or fuse them differently (Phi-3: ``self_attn.qkv_proj``,
# ``mlp.gate_up_proj``): every ``nn.Linear`` under a block's ``self_attn`` and ``mlp`` is a
# target, whatever its name.
TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TARGET_PARENTS = ("self_attn", "mlp")

METHODS = ("serq", "flatten", "rtn", "smoothquant", "l2qer")

# Targets reading the same activation (one SmoothQuant scale per group); fused projections
# are a group of their own.
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)
LOWRANK_BITS = 8  # L2QER: bits of both low-rank factors and of the intermediate X A
WEIGHT_QUANTS = ("rtn", "gptq")
WEIGHT_SCALES = ("mse", "absmax")


# --------------------------------------------------------------------------- quantizers


def _grouped(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """View the last dim of ``x`` as ``[G, g]``, zero-padding a partial last group.

    Zero padding leaves every statistic used here unchanged (the activation range always
    contains 0; the weight statistic is an absmax), so a partial group's scale is that of
    its real elements.
    """
    K = x.shape[-1]
    g = group if group else K
    G = -(-K // g)
    pad = G * g - K
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], G, g), K


def quantize_activations(
    x: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic asymmetric per-token, per-group quantization over the last dim of ``x``.

    Returns ``(q, scale, zero)`` as float32: ``q [..., K]`` integer codes in ``[0, 2^bits - 1]``,
    ``scale`` and ``zero`` ``[..., G]``. A token row holding a NaN or infinity gets scale NaN,
    so it dequantizes to NaN, as the op specifies.
    """
    x = x.to(torch.float32)
    xg, K = _grouped(x, group)
    qmax = float(2**bits - 1)
    zero_t = torch.zeros((), dtype=torch.float32, device=x.device)
    lo = torch.minimum(xg.amin(dim=-1), zero_t)
    hi = torch.maximum(xg.amax(dim=-1), zero_t)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(xg / scale[..., None]) + zero[..., None], 0, qmax)
    bad = ~torch.isfinite(x).all(dim=-1)
    q = torch.nan_to_num(q, nan=0.0).reshape(*x.shape[:-1], -1)[..., :K]
    zero = torch.nan_to_num(zero, nan=0.0)
    scale = torch.where(bad[..., None], torch.full_like(scale, float("nan")), scale)
    return q, scale, zero


def dequantize_activations(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> torch.Tensor:
    K = q.shape[-1]
    g = group if group else K
    idx = torch.arange(K, device=q.device) // g
    return (q - zero[..., idx]) * scale[..., idx]


def fake_quant_activations(x: torch.Tensor, bits: Optional[int], group: int) -> torch.Tensor:
    """``deq(Qa(x))`` in float32; ``bits=None`` disables the quantizer."""
    if bits is None:
        return x.to(torch.float32)
    q, scale, zero = quantize_activations(x, bits, group)
    return dequantize_activations(q, scale, zero, group)


def _clip_ratios(device=None) -> torch.Tensor:
    """1, 63/64, ..., 1/2: the scale's candidate fractions of ``max|w| / qmax``."""
    return (1.0 - torch.arange(33, dtype=torch.float64, device=device) / 64).to(torch.float32)


def weight_group_scale(
    wg: torch.Tensor, bits: int, search: bool = False
) -> tuple[torch.Tensor, float]:
    """Scales ``[...]`` of weight groups ``wg: [..., g]`` and the lowest code.

    Absmax: ``max|w| / qmax``, codes down to ``-qmax``. ``search``: every candidate ratio is tried
    at once and the one with the least squared error (float64) wins, the largest on a tie; codes
    down to ``-qmax - 1``. Zero scales become 1.
    """
    qmax = float(2 ** (bits - 1) - 1)
    am = wg.to(torch.float32).abs().amax(dim=-1)
    if not search:
        scale = am / qmax
        return torch.where(scale == 0, torch.ones_like(scale), scale), -qmax
    lo = -qmax - 1
    c = _clip_ratios(wg.device).reshape(-1, *([1] * am.dim()))
    cand = am[None] * c / qmax  # [C, ...]
    cand = torch.where(cand == 0, torch.ones_like(cand), cand)
    w32 = wg.to(torch.float32)[None]
    q = torch.clamp(torch.round(w32 / cand[..., None]), lo, qmax)
    err = ((w32.double() - q.double() * cand[..., None].double()) ** 2).sum(dim=-1)
    best = torch.argmin(err, dim=0)  # first minimum: the largest ratio among equals
    return torch.gather(cand, 0, best[None])[0], lo


def quantize_weight(w: torch.Tensor, bits: int, group: int,
                    search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of ``w: [K, N]`` in groups of ``group`` rows.

    ``group == 0``: one group over all rows (one scale per output column). Returns float32
    ``(codes [K, N], scale [G, N])``; scales as :func:`weight_group_scale` chooses them.
    """
    w = w.to(torch.float32)
    K, N = w.shape
    wg, _ = _grouped(w.T, group)  # [N, G, g]
    qmax = float(2 ** (bits - 1) - 1)
    scale, lo = weight_group_scale(wg, bits, search)  # [N, G]
    codes = torch.clamp(torch.round(wg / scale[..., None]), lo, qmax)
    codes = codes.reshape(N, -1)[:, :K].T.contiguous()
    return codes, scale.T.contiguous()


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    K = codes.shape[0]
    g = group if group else K
    return codes * scale[torch.arange(K, device=codes.device) // g]


def fake_quant_weight(w: torch.Tensor, bits: Optional[int], group: int,
                      search: bool = False) -> torch.Tensor:
    """``deq(Qw(w))`` in float32; ``bits=None`` disables the quantizer."""
    if bits is None:
        return w.to(torch.float32).clone()
    codes, scale = quantize_weight(w, bits, group, search)
    return dequantize_weight(codes, scale, group)


def gptq_quantize_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al.) of ``w: [K, N]`` given the Hessian ``[K, K]`` of its inputs.

    Same output as :func:`quantize_weight`: float32 ``(codes [K, N], scale [G, N])``, symmetric,
    static groups of ``group`` consecutive input channels. Input channels are quantized in
    natural order; a group's scale is the absmax of its *error-updated* weights when the sweep
    reaches its first channel; each channel's rounding error, divided by the diagonal of the
    upper Cholesky factor of ``H^-1``, is subtracted from the channels after it. ``damp`` times
    the mean diagonal is added to ``H``'s diagonal; channels with a zero diagonal (never seen in
    calibration) get a unit diagonal and no coupling, so they are rounded to nearest (kept, not
    zeroed). Arithmetic in float64; the quantizer itself in float32, as :func:`quantize_weight`
    (``search``: each group's scale by :func:`weight_group_scale`'s search on updated weights).
    """
    K, N = w.shape
    W = w.detach().to(torch.float64).T.clone()  # [N, K]: GPTQ's layout, columns = inputs
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    if H.shape != (K, K):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match K={K}")
    dead = torch.diag(H) == 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    idx = torch.arange(K, device=W.device)
    H[idx[dead], idx[dead]] = 1.0
    H[idx, idx] += damp * torch.diag(H).mean()
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(f"Hessian is not positive definite with damp={damp}")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    g = group if group else K
    blk = g * max(1, block // g)  # whole groups per block: a group's scale sees updated weights
    qmax = float(2 ** (bits - 1) - 1)
    codes = torch.zeros(N, K, dtype=torch.float32, device=W.device)
    scales = torch.zeros(N, -(-K // g), dtype=torch.float32, device=W.device)
    scale, lo = scales[:, 0], -qmax
    for i1 in range(0, K, blk):
        i2 = min(i1 + blk, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                scale, lo = weight_group_scale(W1[:, i : i + g].to(torch.float32), bits, search)
                scales[:, col // g] = scale
            w_col = W1[:, i]
            q = torch.clamp(torch.round(w_col.to(torch.float32) / scale), lo, qmax)
            codes[:, col] = q
            err = (w_col - (q * scale).to(torch.float64)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes.T.contiguous(), scales.T.contiguous()


def layer_input_hessian(
    hessian: torch.Tensor, inv_s: torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """Hessian of ``X^ = (X * inv_s)[..., perm]`` from that of ``X`` (original channel order)."""
    h = hessian.to(torch.float64)
    d = inv_s.to(device=h.device, dtype=torch.float64)
    h = h * d[:, None] * d[None, :]
    p = perm.to(h.device)
    return h[p][:, p]


# --------------------------------------------------------------------------- one layer


@dataclass
class SerqLayerWeights:
    """Offline SERQ data of one linear layer, all float32 and dequantized.

    ``X^ = (X * inv_s)[..., perm]``; ``Y = Qa(X^) @ w_main + Qa(X^)[..., :rank] @ R``.
    ``w_hat`` is the exact flattened, permuted weight, kept for error analysis. L2QER adds the
    quantized low-rank factors ``A [K, r]``, ``B [r, N]``: ``+ Q8(Qa(X^) @ A) @ B``.
    """

    inv_s: torch.Tensor  # [K], in original channel order
    perm: torch.Tensor  # [K] int64
    w_hat: torch.Tensor  # [K, N]
    w_main: torch.Tensor  # [K, N]
    R: torch.Tensor  # [rank, N]
    A: Optional[torch.Tensor] = None  # [K, r], L2QER only
    B: Optional[torch.Tensor] = None  # [r, N]

    @property
    def rank(self) -> int:
        return int(self.R.shape[0])

    def effective_weight(self) -> torch.Tensor:
        """The float weight applied to ``deq(Qa(X^))``: ``w_main + [R; 0]``."""
        w = self.w_main.clone()
        w[: self.rank] += self.R
        return w


def floor_scales(s: torch.Tensor, scale_floor: float) -> torch.Tensor:
    """``max(s, floor * max(s))`` so that no channel is divided by ~0."""
    s = s.to(torch.float32)
    return torch.maximum(s, scale_floor * s.max())


def smoothquant_scales(
    absmax: torch.Tensor, weights_kn: Sequence[torch.Tensor], alpha: float, scale_floor: float
) -> torch.Tensor:
    """SmoothQuant (Xiao et al.): ``s_j = max|X_j|^alpha / max|W_j.|^(1-alpha)``, floored.

    ``weights_kn`` are the ``[K, N]`` weights of every layer reading this input; their row
    maxima are taken together and floored first (an all-zero row must not divide by 0). The
    powers are computed in float64.
    """
    wmax = torch.stack([w.detach().to(torch.float32).abs().amax(dim=1) for w in weights_kn])
    wmax = wmax.amax(dim=0)
    if float(wmax.max()) == 0:
        wmax = torch.ones_like(wmax)
    w = floor_scales(wmax, scale_floor).to(torch.float64)
    a = absmax.to(torch.float32).to(torch.float64)
    s = floor_scales((a**alpha / w ** (1.0 - alpha)).to(torch.float32), scale_floor)
    return torch.where(s > 0, s, torch.ones_like(s))


def lowrank_error_factors(
    w_kn: torch.Tensor, w_deq: torch.Tensor, absmean: torch.Tensor, rank: int, scale_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2QER (Zhang et al., 2024): rank-``rank`` factors of the weight error, float64.

    ``S E = U Sigma V^T`` with ``E = w_kn - w_deq`` and ``S = diag(a)``, ``a`` the floored
    per-channel mean ``|x|``; returns ``A = S^-1 U_r Sigma_r`` ``[K, r]`` and ``B = V_r^T``
    ``[r, N]``. Each singular pair's sign is fixed (largest-magnitude entry of ``U``'s column
    positive): a sign flip leaves ``A B`` alone but changes how the intermediate ``X A`` is
    quantized (its per-token range is asymmetric), so it is pinned down.
    """
    a = floor_scales(absmean, scale_floor).to(torch.float64)
    err = w_kn.detach().to(torch.float32).to(torch.float64) - w_deq.to(torch.float64)
    u, sig, vh = torch.linalg.svd(a[:, None] * err, full_matrices=False)
    u, sig, vh = u[:, :rank], sig[:rank], vh[:rank]
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1])])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, vh = u * sign[None, :], vh * sign[:, None]
    return (u * sig[None, :]) / a[:, None], vh


def build_layer_weights(
    weight_kn: torch.Tensor,
    s: Optional[torch.Tensor],
    *,
    rank: int,
    bits_w: Optional[int],
    group_w: int,
    weight_quant: str = "rtn",
    hessian: Optional[torch.Tensor] = None,
    gptq_damp: float = 0.01,
    permute: bool = True,
    lowrank: int = 0,
    absmean: Optional[torch.Tensor] = None,
    scale_floor: float = 1e-5,
    weight_scale: str = "absmax",
) -> SerqLayerWeights:
    """Flatten by ``s``, sort channels by descending ``s``, split off the salient ``R``.

    ``weight_kn`` is ``[K, N]`` (``nn.Linear.weight.T``); ``s`` the floored per-input-channel
    absmax, or None for no flattening and no permutation (plain round to nearest).
    ``weight_quant="gptq"`` quantizes the main weight with :func:`gptq_quantize_weight` against
    ``hessian``, the ``[K, K]`` second moment of the layer's input in original channel order
    (transformed here to the flattened, permuted input). ``permute=False`` keeps the channel
    order (SmoothQuant). ``lowrank > 0`` adds L2QER's factors of the main weight's error, scaled
    by ``absmean`` (per-channel mean ``|x|``), quantized to 8 bits in groups of ``group_w``.
    ``weight_scale="mse"`` searches the main weight's group scales (:func:`weight_group_scale`).
    """
    if weight_quant not in WEIGHT_QUANTS:
        raise ValueError(f"weight_quant must be one of {WEIGHT_QUANTS}, got {weight_quant!r}")
    if weight_scale not in WEIGHT_SCALES:
        raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
    search = weight_scale == "mse"
    if weight_quant == "gptq" and bits_w is not None and hessian is None:
        raise ValueError("weight_quant='gptq' needs the layer's input Hessian")
    w = weight_kn.detach().to(torch.float32)
    K, N = w.shape
    if s is None:
        s = torch.ones(K, dtype=torch.float32, device=w.device)
        perm = torch.arange(K, device=w.device)
    else:
        s = s.detach().to(device=w.device, dtype=torch.float32)
        perm = torch.argsort(-s, stable=True) if permute else torch.arange(K, device=w.device)
    w_hat = (s[:, None] * w)[perm]
    r = max(0, min(rank, K))
    residual = w_hat.clone()
    if r:
        R = fake_quant_weight(w_hat[:r], bits_w, 0)
        residual[:r] -= R
    else:
        R = w_hat.new_zeros((0, N))
    inv_s = 1.0 / s
    if weight_quant == "gptq" and bits_w is not None:
        h_hat = layer_input_hessian(hessian, inv_s, perm)
        codes, scale = gptq_quantize_weight(residual, h_hat, bits_w, group_w, damp=gptq_damp,
                                            search=search)
        w_main = dequantize_weight(codes, scale, group_w)
    else:
        w_main = fake_quant_weight(residual, bits_w, group_w, search)
    A = B = None
    r_lr = max(0, min(lowrank, K, N))
    if r_lr and bits_w is not None:
        if absmean is None:
            raise ValueError("the L2QER low-rank branch needs the per-channel mean |x|")
        a_f, b_f = lowrank_error_factors(w_hat, w_main, absmean[perm.cpu()].to(w.device),
                                         r_lr, scale_floor)
        A = fake_quant_weight(a_f, LOWRANK_BITS, group_w)
        B = fake_quant_weight(b_f, LOWRANK_BITS, group_w)
    return SerqLayerWeights(inv_s=inv_s, perm=perm, w_hat=w_hat, w_main=w_main, R=R, A=A, B=B)


class SerqFakeQuantLinear(nn.Module):
    """Drop-in replacement of an ``nn.Linear`` computing the SERQ layer in fake quantization."""

    def __init__(
        self,
        lw: SerqLayerWeights,
        bias: Optional[torch.Tensor],
        *,
        bits_a: Optional[int],
        group_a: int,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = lw.w_main.shape
        self.rank = lw.rank
        self.bits_a = bits_a
        self.group_a = group_a
        self.register_buffer("inv_s", lw.inv_s.contiguous())
        self.register_buffer("perm", lw.perm.contiguous())
        self.register_buffer("w_main", lw.w_main.contiguous())
        self.register_buffer("R", lw.R.contiguous())
        self.register_buffer("A", None if lw.A is None else lw.A.contiguous())
        self.register_buffer("B", None if lw.B is None else lw.B.contiguous())
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).clone()
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        s: Optional[torch.Tensor],
        *,
        bits_a: Optional[int] = 8,
        bits_w: Optional[int] = 4,
        rank: int = 128,
        group_w: int = 128,
        group_a: int = 128,
        **weight_options,
    ) -> "SerqFakeQuantLinear":
        """``weight_options``: the other keyword arguments of :func:`build_layer_weights`."""
        lw = build_layer_weights(linear.weight.T, s, rank=rank, bits_w=bits_w, group_w=group_w,
                                 **weight_options)
        return cls(lw, linear.bias, bits_a=bits_a, group_a=group_a)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``X^ = (X / s)[..., perm]`` in float32."""
        return (x.to(torch.float32) * self.inv_s)[..., self.perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant_activations(self.transform_input(x), self.bits_a, self.group_a)
        y = xq @ self.w_main
        if self.rank:
            y = y + xq[..., : self.rank] @ self.R
        if self.A is not None:
            z = fake_quant_activations(xq @ self.A, LOWRANK_BITS, self.group_a)
            y = y + z @ self.B
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bits_a={self.bits_a}, group_a={self.group_a}"
        )


# --------------------------------------------------------------------------- whole model


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("model has no decoder layers at .model.layers")
    return layers


def _layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Name within the block (``self_attn.q_proj``) -> every ``nn.Linear`` under the block's
    ``self_attn`` and ``mlp``, in module order."""
    found: dict[str, nn.Linear] = {}
    for parent in TARGET_PARENTS:
        sub = getattr(layer, parent, None)
        if sub is None:
            raise ValueError(f"decoder layer {type(layer).__name__} has no .{parent}")
        for name, mod in sub.named_modules():
            if isinstance(mod, nn.Linear):
                found[f"{parent}.{name}"] = mod
    if not found:
        raise ValueError(f"decoder layer {type(layer).__name__} has no nn.Linear under "
                         f"{' or '.join(TARGET_PARENTS)}")
    return found


def _targets(model: nn.Module, lm_head: bool = False) -> dict[str, nn.Linear]:
    """Full module name -> target nn.Linear, in model order (the LM head last, if asked)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for layer in _decoder_layers(model):
        for mod in _layer_linears(layer).values():
            out[names[id(mod)]] = mod
    if lm_head:
        head = getattr(model, "lm_head", None)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"model.lm_head is {type(head).__name__}, not nn.Linear")
        out["lm_head"] = head
    return out


def _as_sequences(ids) -> list[torch.Tensor]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(ids, dtype=torch.long)
        if t.dim() == 1:
            t = t[None]
        return list(t)
    return [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in ids]


@torch.no_grad()
def _calibrate(
    model: nn.Module, calib_ids, *, absmax: bool, hessian: bool, absmean: bool = False,
    lm_head: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One float pass over the calibration sequences collecting the requested statistics:
    ``(absmax, hessians, absmean)``, each empty unless requested.

    Targets fed the very same tensor (q/k/v, gate/up) share one Hessian accumulator, so memory
    is one ``[K, K]`` float64 matrix per distinct input. ``lm_head``: the LM head is a target too.
    """
    targets = _targets(model, lm_head)
    stats: dict[str, torch.Tensor] = {}
    abssums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    grams: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this sequence's inputs, by identity
    tokens = [0]

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0]  # not detached: a detached view would be a new object each time
            x2 = x.detach().to(torch.float32).reshape(-1, x.shape[-1])
            if absmax:
                m = x2.abs().amax(dim=0)
                prev = stats.get(name)
                stats[name] = m if prev is None else torch.maximum(prev, m)
            if absmean:
                a = x2.abs().to(torch.float64).sum(dim=0)
                abssums[name] = a if name not in abssums else abssums[name] + a
                counts[name] = counts.get(name, 0) + x2.shape[0]
            if hessian and name not in alias:
                first = seen.get(id(x))
                if first is not None and first[0] is x:
                    alias[name] = first[1]
                    return
                seen[id(x)] = (x, name)
                xd = x2.to(torch.float64)
                g = xd.T @ xd
                grams[name] = g if name not in grams else grams[name] + g

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for seq in _as_sequences(calib_ids):
            seen.clear()
            model(input_ids=seq[None].to(device), use_cache=False)
            tokens[0] += int(seq.numel())
    finally:
        seen.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in targets if (absmax and n not in stats) or (absmean and n not in abssums)
               or (hessian and n not in grams and n not in alias)]
    if missing:
        raise RuntimeError(f"calibration never reached {missing[:3]}")
    hess = {n: grams[alias.get(n, n)] for n in targets} if hessian else {}
    for n in {alias.get(n, n) for n in hess}:
        grams[n] /= max(tokens[0], 1)  # shared by aliases: divided once, in place
    means = {n: (abssums[n] / counts[n]).cpu() for n in targets} if absmean else {}
    return ({n: stats[n].cpu() for n in targets} if absmax else {}), hess, means


def calibrate_absmax(
    model: nn.Module, calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of every target's input over all calibration tokens.

    Runs the model as it is (float), one sequence at a time. Keys are full module names
    (``model.layers.0.self_attn.q_proj``); values float32 ``[K]``, not floored.
    """
    return _calibrate(model, calib_ids, absmax=True, hessian=False)[0]


def calibrate_absmean(
    model: nn.Module, calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-input-channel mean ``|x|`` (float64 ``[K]``) of every target's input over all
    calibration tokens: L2QER's activation-aware scaling. Keys as in :func:`calibrate_absmax`.
    """
    return _calibrate(model, calib_ids, absmax=False, hessian=False, absmean=True)[2]


def calibrate_hessians(
    model: nn.Module, calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-token second moment ``mean_t x_t^T x_t`` (float64 ``[K, K]``) of every target's input.

    The GPTQ Hessian up to a constant, in original channel order, from the float model. Keys as
    in :func:`calibrate_absmax`; targets reading the same input share one tensor.
    """
    return _calibrate(model, calib_ids, absmax=False, hessian=True)[1]


def apply_serq_fakequant(
    model: nn.Module,
    calib_ids: Union[torch.Tensor, Sequence[torch.Tensor], None],
    *,
    bits_a: Optional[int] = 8,
    bits_w: Optional[int] = 4,
    rank: int = 128,
    group_w: int = 128,
    group_a: Optional[int] = None,
    method: str = "serq",
    scale_floor: float = 1e-5,
    absmax: Optional[dict[str, torch.Tensor]] = None,
    weight_quant: Optional[str] = None,
    gptq_damp: float = 0.01,
    hessians: Optional[dict[str, torch.Tensor]] = None,
    smooth_alpha: float = 0.5,
    absmean: Optional[dict[str, torch.Tensor]] = None,
    weight_scale: Optional[str] = None,
    lm_head: str = "float",
) -> nn.Module:
    """Replace the linears of every decoder layer (those under ``self_attn`` and ``mlp``) by
    :class:`SerqFakeQuantLinear`, in place.

    ``method``: ``"serq"`` (flattening, permutation, salient ``R`` of ``rank`` rows),
    ``"flatten"`` (the same without ``R``) or ``"rtn"`` (plain round to nearest: no flattening,
    no permutation, no ``R``; needs no calibration). ``absmax`` reuses statistics from
    :func:`calibrate_absmax` instead of running the calibration again. ``bits_a`` / ``bits_w``
    None disable that quantizer. ``weight_quant="gptq"`` quantizes each main weight with GPTQ
    (dampening ``gptq_damp``) against its input Hessian from the float model on ``calib_ids``
    (or ``hessians``, from :func:`calibrate_hessians`); ``"rtn"`` rounds it to nearest; None:
    GPTQ for ``"serq"`` and ``"flatten"``, round to nearest for the baselines.
    ``weight_scale``: ``"mse"`` (clipping searched) or ``"absmax"`` main weight group scales;
    None: mse for ``"serq"`` and ``"flatten"``, absmax for the baselines.
    ``group_a`` None: 32 for 4-bit activations, else 128. The model is converted to float32 and
    returned.

    Baselines at the same bits and groups: ``"smoothquant"`` divides each input by
    :func:`smoothquant_scales` (strength ``smooth_alpha``; one scale per input shared by q/k/v and
    by gate/up) without permutation or ``R``; ``"l2qer"`` keeps the input as is and adds the
    8-bit low-rank correction of rank ``rank`` from :func:`lowrank_error_factors`, scaled by the
    per-channel mean ``|x|`` (``absmean``, from :func:`calibrate_absmean`, or calibrated here).

    ``lm_head="int8"`` fake-quantizes the LM head as the converter's ``--lm-head int8`` does: the
    same method, groups and calibration, 8-bit weights and activations, no salient rows (a tied
    head gets its own copy of the embedding). ``"float"`` keeps it.
    """
    from .plan import LM_HEAD_BITS

    if lm_head != "float" and lm_head not in LM_HEAD_BITS:
        raise ValueError(f"lm_head must be 'float' or one of {sorted(LM_HEAD_BITS)}, got {lm_head!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weight_quant is None:
        weight_quant = "gptq" if method in ("serq", "flatten") else "rtn"
    if weight_scale is None:
        weight_scale = "mse" if method in ("serq", "flatten") else "absmax"
    if weight_quant not in WEIGHT_QUANTS:
        raise ValueError(f"weight_quant must be one of {WEIGHT_QUANTS}, got {weight_quant!r}")
    if group_a is None:
        group_a = 32 if bits_a == 4 else 128
    model.float()
    with_head = lm_head != "float"
    targets = _targets(model, with_head)
    need_absmax = method not in ("rtn", "l2qer") and absmax is None
    need_hess = weight_quant == "gptq" and bits_w is not None and hessians is None
    need_absmean = method == "l2qer" and absmean is None
    if need_absmax or need_hess or need_absmean:
        if calib_ids is None:
            what = "absmax" if need_absmax else "absmean" if need_absmean else "hessians"
            raise ValueError(f"method {method!r} with weight_quant {weight_quant!r} needs "
                             f"calib_ids or {what}")
        got_absmax, got_hess, got_absmean = _calibrate(
            model, calib_ids, absmax=need_absmax, hessian=need_hess, absmean=need_absmean,
            lm_head=with_head)
        absmax = got_absmax if need_absmax else absmax
        hessians = got_hess if need_hess else hessians
        absmean = got_absmean if need_absmean else absmean
    if method in ("rtn", "l2qer"):
        scales: dict[str, Optional[torch.Tensor]] = {n: None for n in targets}
    elif method == "smoothquant":
        name_of = {id(m): n for n, m in targets.items()}
        scales = {}
        for layer in _decoder_layers(model):
            linears = _layer_linears(layer)
            ungrouped = set(linears) - {m for g in INPUT_GROUPS for m in g}
            if ungrouped:
                raise ValueError(f"smoothquant: no input group for {sorted(ungrouped)}")
            for members in INPUT_GROUPS:
                if not all(m in linears for m in members):
                    continue
                names = [name_of[id(linears[m])] for m in members]
                s = smoothquant_scales(absmax[names[0]], [targets[n].weight.T for n in names],
                                       smooth_alpha, scale_floor)
                scales.update({n: s for n in names})
        if with_head:
            scales["lm_head"] = smoothquant_scales(absmax["lm_head"], [targets["lm_head"].weight.T],
                                                   smooth_alpha, scale_floor)
    else:
        scales = {n: floor_scales(absmax[n], scale_floor) for n in targets}
    r = rank if method == "serq" else 0
    for name, lin in targets.items():
        head = name == "lm_head"
        bw, ba = LM_HEAD_BITS[lm_head] if head else (bits_w, bits_a)
        new = SerqFakeQuantLinear.from_linear(
            lin, scales[name], bits_a=ba, bits_w=bw, rank=0 if head else r, group_w=group_w,
            group_a=group_a, weight_quant=weight_quant, gptq_damp=gptq_damp,
            hessian=None if hessians is None else hessians[name],
            permute=method != "smoothquant", lowrank=rank if method == "l2qer" and not head else 0,
            absmean=None if absmean is None else absmean[name], scale_floor=scale_floor,
            weight_scale=weight_scale,
        ).to(lin.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def fakequant_logits(
    hf_dir: Union[str, Path],
    calib_ids: Union[torch.Tensor, Sequence[torch.Tensor], None],
    eval_ids: Union[torch.Tensor, np.ndarray],
    *,
    weight_quant: Optional[str] = None,
    **kw,
) -> np.ndarray:
    """Load a Hugging Face causal LM in float32, fake-quantize it, return logits of ``eval_ids``.

    ``eval_ids`` is ``[batch, seq]`` (no padding); the result is float32 ``[batch, seq, vocab]``.
    ``weight_quant`` (``"gptq"``, ``"rtn"`` or None) and the other keyword arguments go to
    :func:`apply_serq_fakequant`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager")
    model.float().eval()
    apply_serq_fakequant(model, calib_ids, weight_quant=weight_quant, **kw)
    ids = torch.as_tensor(np.asarray(eval_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits.to(torch.float32).cpu().numpy()
