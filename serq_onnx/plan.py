"""What the passes share: the conversion settings and the targets they find and annotate.

The graph itself carries every float transform (folded initializers, run-time Gather/Mul); the
plan carries what is not graph structure: calibration statistics and the quantized weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .errors import SerqError
from .gram_chunks import DEFAULT_GRAM_MEMORY_MIB, check_budget, plan_chunks

SCHEMES = {
    # name: (bits_w, bits_a)
    "w4a8": (4, 8),
    "w4a4": (4, 4),
}
METHODS = ("serq", "rtn", "flatten", "smoothquant", "l2qer")
WEIGHT_QUANTS = ("rtn", "gptq")
WEIGHT_SCALES = ("mse", "absmax")
# Main weight rounding per method when none is given: as each method was published (SERQ's
# reference code uses GPTQ; the baselines round to nearest).
DEFAULT_WEIGHT_QUANT = {"serq": "gptq", "flatten": "gptq", "rtn": "rtn", "smoothquant": "rtn",
                        "l2qer": "rtn"}
# Weight-group scales per method when none is given: the least-error search for SERQ; absmax for
# the baselines, as published and because the search hurts them on SmolLM2 (SmoothQuant w4a8:
# 38.8 against 30.2 perplexity): unweighted, it clips the rows that migration made large.
DEFAULT_WEIGHT_SCALE = {"serq": "mse", "flatten": "mse", "rtn": "absmax",
                        "smoothquant": "absmax", "l2qer": "absmax"}
# Activation group per scheme when none is given: 8-bit activations lose 0.3% perplexity at
# groups of 128 on SmolLM2; 4-bit ones need groups of 32 (models/smollm2-135m/RESULTS.md).
DEFAULT_GROUP_A = {"w4a8": 128, "w4a4": 32}
# lm_head: kept float, or int8 (8-bit weights and activations through SerqMatMul, no R). The
# head reads vocab x hidden weights per decoded token, more than all 4-bit decoder layers of a
# small model together; int8 costs SmolLM2 +0.04% perplexity at w4a8 and +0.06% at w4a4
# (models/smollm2-135m/RESULTS.md). auto (the default): int8 where the logits come from a
# MatMul with a constant (or transposed constant) weight, else float.
LM_HEADS = ("auto", "float", "int8")
LM_HEAD_BITS = {"int8": (8, 8), "auto": (8, 8)}


@dataclass(frozen=True)
class ConvertConfig:
    """User-facing conversion settings (``serq-onnx convert`` flags)."""

    scheme: str = "w4a8"
    rank: int = 128
    group_w: int = 128
    group_a: int | None = None  # None: DEFAULT_GROUP_A of the scheme
    method: str = "serq"
    scale_floor: float = 1e-5
    weight_quant: str | None = None  # main weight rounding: gptq or rtn (None: the method's own)
    weight_scale: str | None = None  # group scales: mse (searched) or absmax (None: the method's)
    gptq_damp: float = 0.01  # GPTQ dampening, as a fraction of the Hessian's mean diagonal
    smooth_alpha: float = 0.5  # SmoothQuant migration strength (method "smoothquant" only)
    lm_head: str = "auto"  # LM_HEADS
    # Regular expression (re.search) over decoder linears' labels (layers.3.mlp.down_proj) and
    # node names: only those are converted, the rest stay float. None: every one.
    layers: str | None = None
    # MiB of GPTQ Gram matrices held at once (serq_onnx.gram_chunks): over it, they are
    # collected and consumed in chunks of layers, one calibration pass per chunk. The model is
    # the same either way.
    gram_memory_mib: float = DEFAULT_GRAM_MEMORY_MIB
    # The float onnxruntime sessions of conversion (checks, calibration) read the weights from
    # the model file as mapped, instead of copying them into prepacked buffers
    # (compare.session_options): a model's float weights are then held once, in the page
    # cache, not once more per session. Forward passes run about 25% slower and their float
    # rounding differs (logits by ~1e-6), so the converted model may differ in a few codes.
    low_memory: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SerqError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise SerqError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.weight_quant is None:
            object.__setattr__(self, "weight_quant", DEFAULT_WEIGHT_QUANT[self.method])
        if self.weight_scale is None:
            object.__setattr__(self, "weight_scale", DEFAULT_WEIGHT_SCALE[self.method])
        if self.weight_quant not in WEIGHT_QUANTS:
            raise SerqError(f"unknown weight quantizer {self.weight_quant!r}; choose one of "
                            f"{', '.join(WEIGHT_QUANTS)}")
        if self.weight_scale not in WEIGHT_SCALES:
            raise SerqError(f"unknown weight scale rule {self.weight_scale!r}; choose one of "
                            f"{', '.join(WEIGHT_SCALES)}")
        if self.group_a is None:
            object.__setattr__(self, "group_a", DEFAULT_GROUP_A[self.scheme])
        if self.lm_head not in LM_HEADS:
            raise SerqError(f"unknown --lm-head {self.lm_head!r}; choose one of "
                            f"{', '.join(LM_HEADS)}")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except (re.error, TypeError) as err:
                raise SerqError(f"--layers {self.layers!r} is not a regular expression ({err}); "
                                r"e.g. 'mlp' or 'layers\.(0|1)\.'") from None
        object.__setattr__(self, "gram_memory_mib", check_budget(self.gram_memory_mib))
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
            raise SerqError(f"gptq_damp must be a number in (0, 1], got {damp!r}")
        alpha = self.smooth_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise SerqError(f"--alpha must be a number in [0, 1], got {alpha!r}")
        if self.rank < 0:
            raise SerqError(f"--rank must be >= 0, got {self.rank}")
        if self.group_w < 2 or self.group_w % 2:
            raise SerqError(f"--group-w must be an even number >= 2, got {self.group_w}")
        ga, gw = self.group_a, self.group_w
        if ga < 0 or (ga and ga % gw and gw % ga):
            raise SerqError(f"--group-a must be 0 (whole row), a multiple of --group-w ({gw}) "
                            f"or a divisor of it, got {ga}")

    @property
    def bits_w(self) -> int:
        return SCHEMES[self.scheme][0]

    @property
    def bits_a(self) -> int:
        return SCHEMES[self.scheme][1]

    @property
    def flattens(self) -> bool:
        """Whether inputs are divided by per-channel scales folded into the weights."""
        return self.method in ("serq", "flatten", "smoothquant")

    @property
    def needs_calibration(self) -> bool:
        """Flattening needs the absmax statistics, L2QER the mean |x|, GPTQ the Gram matrices."""
        return self.flattens or self.method == "l2qer" or self.weight_quant == "gptq"

    @property
    def effective_rank(self) -> int:
        return self.rank if self.method == "serq" else 0


@dataclass(eq=False)
class Target:
    """One linear layer to convert: ``MatMul(X, W)`` with ``W`` an initializer ``[K, N]``."""

    node: ir.Node
    name: str  # e.g. "layers.3.mlp.down_proj"
    role: str  # q, k, v, o, gate, up, down
    layer: int
    K: int
    N: int
    weights: object | None = None  # reference.SerqWeights once quantized
    r_codes: np.ndarray | None = None
    r_scale: np.ndarray | None = None
    # computes the main weight before quantization afresh (SalientReconstructionPass); None
    # before that pass and once the layer is packed
    residual: Callable[[], np.ndarray] | None = None
    # computes the float32 flattened, permuted weight afresh (PermuteWeightsPass; the graph may
    # hold another dtype); None before that pass and for methods that do not flatten
    w_hat: Callable[[], np.ndarray] | None = None
    bits: tuple[int, int] | None = None  # (bits_w, bits_a) of this layer when not the scheme's
    rank_cap: int | None = None  # largest salient rank this layer takes (lm_head: 0)
    lowrank: tuple[np.ndarray, np.ndarray] | None = None  # l2qer: float A [K, r], B [r, N]

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    def layer_bits(self, cfg: ConvertConfig) -> tuple[int, int]:
        """``(bits_w, bits_a)`` of this layer."""
        return self.bits or (cfg.bits_w, cfg.bits_a)

    def layer_rank(self, cfg: ConvertConfig) -> int:
        """The salient rank this layer gets: the asked one, capped at K (and at ``rank_cap``)."""
        r = min(cfg.effective_rank, self.K)
        return r if self.rank_cap is None else min(r, self.rank_cap)

    def weight_f32(self) -> np.ndarray:
        """The weight the quantizers start from, in float32: a new array each call."""
        if self.w_hat is not None:
            return self.w_hat()
        return initializer_array(self.weight).astype(np.float32)

    def residual_f32(self) -> np.ndarray:
        """The residual main weight the quantizers round, in float32."""
        return self.residual()


@dataclass(eq=False)
class InputGroup:
    """Targets that read the same activation, hence share one ``s``, one ``pi``.

    kind: ``norm`` (output of an RMSNorm's ``Mul(gamma)``), ``mlp_act`` (``act(gate) * up``,
    act elementwise), ``attn_out`` (attention output before o_proj).
    """

    value: ir.Value
    kind: str
    targets: list[Target]
    gamma_index: int | None = None  # norm: which input of the producer is gamma
    gate: Target | None = None  # mlp_act: the gate and up projections feeding it
    up: Target | None = None
    # mlp_act: the columns of gate's / up's output that are the gate / up (a fused gate_up
    # projection cut by Slice); None: all of them.
    gate_cols: tuple[int, int] | None = None
    up_cols: tuple[int, int] | None = None
    mlp_nodes: list = field(default_factory=list)  # mlp_act: the ops between them and the product
    absmax: np.ndarray | None = None
    absmean: np.ndarray | None = None  # per-channel mean |x| (calibrated for l2qer only)
    gram: np.ndarray | None = None  # float32 [K, K]: sum over calibration tokens of x^T x
    tokens: int = 0  # calibration tokens behind ``gram``
    s: np.ndarray | None = None
    perm: np.ndarray | None = None
    folded: list[str] = field(default_factory=list)  # what was folded statically, for reports
    runtime_reason: str = ""  # why what is not folded is applied by the op at run time

    @property
    def K(self) -> int:
        return self.targets[0].K

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.targets[:1]) + ".input"


@dataclass(eq=False)
class Plan:
    config: ConvertConfig
    groups: list[InputGroup] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)  # linears --layers did not select
    # Where GPTQPass collects the Gram matrices chunk by chunk when they did not all fit
    # gram_memory_mib (passes.calibrate.SavedFloatGraph); None: CalibratePass collected them.
    gram_source: object | None = None
    # Where the quantizers write each layer's packed weights (serq_onnx.packed_store), kept
    # by convert() until the output is saved; None: they stay in memory.
    packed_store: object | None = None
    # Whether any linear layer's weight is FP16 (FindTargetsPass; a target's weight is its
    # node's input, which ReplaceMatMulPass makes the packed codes).
    half_precision: bool = False

    @property
    def targets(self) -> list[Target]:
        return [t for g in self.groups for t in g.targets]

    @property
    def prepack(self) -> bool:
        """Whether the conversion's float onnxruntime sessions may copy the weights into their
        prepacked layout (``compare.session_options``): not under ``low_memory``, nor for FP16
        graphs, where onnxruntime's CPU provider would hold float32 copies of the weights
        (twice the model; measured on an FP16 0.47B Llama: peak 4.0x its size, 2.0x without),
        for forward passes 1.2-1.3x slower."""
        return not (self.config.low_memory or self.half_precision)

    def gram_chunks(self) -> list[list[int]]:
        """The group indices of each Gram collection under ``config.gram_memory_mib``, in
        order (``serq_onnx.gram_chunks``); none without GPTQ."""
        if self.config.weight_quant != "gptq":
            return []
        return plan_chunks([g.K for g in self.groups], self.config.gram_memory_mib)


def initializer_array(value: ir.Value) -> np.ndarray:
    if value.const_value is None:
        raise SerqError(f"{value.name} is expected to be an initializer")
    return value.const_value.numpy()


def cast_checked(array: np.ndarray, dtype: np.dtype, name: str,
                 what: str = "flattened weight") -> np.ndarray:
    """``array`` in the graph's float ``dtype``; an overflow (FP16's range is 65504) is the
    user's to hear of, not an infinity in the model."""
    if array.dtype == dtype:
        return array
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    if not np.isfinite(cast).all() and np.isfinite(array).all():
        raise SerqError(f"{name}: the {what} overflows {np.dtype(dtype)} (largest "
                        f"|w| {float(np.abs(array).max()):.3g}); convert the float32 export")
    return cast

