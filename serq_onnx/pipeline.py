"""The conversion pipeline as data: which passes a method runs, in which order, and why.

``STEPS`` is the whole pipeline, one :class:`Step` per pass with the condition under which it
runs; :func:`steps_for` picks the steps of one configuration, so ``convert()`` and
``serq-onnx inspect`` read the same list instead of re-deriving it from method branches. Each
pass states what it needs from the passes before it in its ``requires()`` (checked when it runs,
listed by :func:`describe`).

:func:`run` is a loop rather than ``ir.passes.Sequential`` on purpose: Sequential wraps every
exception in ``PassError``, which would turn a user's ``SerqError`` (calibration overflow, a
shared weight) into a traceback, and the report needs each stage's time.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .plan import ConvertConfig, Plan

# Largest relative RMS logit change the exact folds may cause: float32 rounding, or for FP16
# models the rounding of the scaled gamma and weights to FP16 (3.3e-4 on the tiny test Llama).
FOLD_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


@dataclass(frozen=True)
class Options:
    """Conversion settings that choose passes but are no part of :class:`ConvertConfig`."""

    fuse: bool = True  # FuseSiblingsPass
    fuse_attention: bool = True
    verify: bool = True


@dataclass
class Context:
    """What the passes are built from at run time."""

    plan: Plan
    model_path: Path
    sequences: Sequence[np.ndarray] = ()
    check_sequences: Sequence[np.ndarray] = ()
    progress: bool = True
    ran: dict[str, ir.passes.PassBase] = field(default_factory=dict)  # step name -> its pass
    # Where calibration sequences and GPTQ groups run (None: this process; see distributed.py).
    calib_runner: Callable | None = None
    group_mapper: Callable | None = None


@dataclass(frozen=True)
class Step:
    """One pass of the pipeline.

    ``stage``: the entry of the report's ``timings`` its time adds to. ``when``: whether the
    step runs for a configuration, with ``when_text`` saying so in words. ``make``: the pass,
    built from the run's :class:`Context` (None: run by ``convert()`` itself before the pass
    list, see ``purpose``).
    """

    name: str
    pass_name: str
    purpose: str
    stage: str
    when_text: str
    when: Callable[[ConvertConfig, Options], bool]
    make: Callable[[Context], ir.passes.PassBase] | None = None

    def requires(self) -> str:
        """The pass's preconditions, from its ``requires()`` docstring."""
        from serq_onnx import passes

        cls = getattr(passes, self.pass_name, None)
        method = getattr(cls, "requires", None)
        if method is None or method is ir.passes.PassBase.requires:
            return "nothing"
        doc = inspect.getdoc(method) or ""
        return " ".join(doc.split("\n\n")[0].split()) or "nothing"


def _always(cfg: ConvertConfig, opt: Options) -> bool:
    return True


def _p(name: str) -> Callable[..., ir.passes.PassBase]:
    """The pass class ``name`` of ``serq_onnx.passes``, imported when first used."""
    def get(*args, **kwargs):
        from serq_onnx import passes

        return getattr(passes, name)(*args, **kwargs)
    return get


def _verify_fold(ctx: Context) -> ir.passes.PassBase:
    fp16 = ctx.plan.half_precision
    return _p("VerifyFoldPass")(ctx.model_path, ctx.check_sequences,
                                tolerance=FOLD_TOLERANCE["float16" if fp16 else "float32"],
                                prepack=ctx.plan.prepack)


def _fold_purpose(cfg: ConvertConfig) -> str:
    if cfg.method == "smoothquant":
        return ("SmoothQuant scales s = max|X|^alpha / max|W|^(1-alpha), folded into RMSNorm "
                "gamma and up columns where exact, else applied at run time")
    if cfg.flattens:
        return ("flattening scales s = max|X| and saliency order, folded into RMSNorm gamma "
                "and up/gate columns where exact, else applied at run time")
    return "identity scales and order (this method does not flatten activations)"


STRUCTURE = "structure"
STEPS: tuple[Step, ...] = (
    Step("fuse_attention", "FuseAttentionPass",
         "each layer's attention as GroupQueryAttention, checked against the export (kept as "
         "exported where not recognised or the check fails)", "attention",
         "--fuse-attention (default on)", lambda c, o: o.fuse_attention),
    Step("untie_lm_head", "UntieLMHeadPass",
         "a tied LM head gets its own weight, so it can be quantized apart from the embedding",
         STRUCTURE, "lm_head auto or int8", lambda c, o: c.lm_head != "float",
         lambda ctx: _p("UntieLMHeadPass")()),
    Step("find_targets", "FindTargetsPass",
         "the linear layers to convert, grouped by the activation they read", STRUCTURE,
         "always", _always, lambda ctx: _p("FindTargetsPass")(ctx.plan)),
    Step("calibrate", "CalibratePass",
         "per-channel max|x| of every group input (+ Gram matrices for GPTQ, mean |x| for "
         "L2QER) from the float model on the calibration tokens", "calibration",
         "the method flattens, is l2qer, or the main weight is GPTQ",
         lambda c, o: c.needs_calibration,
         lambda ctx: _p("CalibratePass")(ctx.plan, ctx.sequences, progress=ctx.progress,
                                         runner=ctx.calib_runner)),
    Step("fold_flattening", "FoldFlatteningPass", "", "folding", "always", _always,
         lambda ctx: _p("FoldFlatteningPass")(ctx.plan)),
    Step("permute_weights", "PermuteWeightsPass",
         "weights into flattened, saliency-ordered form W^ = (diag(s) W)[pi]", "folding",
         "the method flattens (serq, flatten, smoothquant)", lambda c, o: c.flattens,
         lambda ctx: _p("PermuteWeightsPass")(ctx.plan)),
    Step("verify_fold", "VerifyFoldPass",
         "the folded float graph still computes the original logits (stops otherwise)",
         "folding", "the method flattens", lambda c, o: c.flattens, _verify_fold),
    Step("salient", "SalientReconstructionPass",
         "R, the 4-bit correction of the first r (most salient) rows, and the residual main "
         "weight", "quantization", "always (rank 0 for every method but serq)", _always,
         lambda ctx: _p("SalientReconstructionPass")(ctx.plan)),
    Step("gptq", "GPTQPass",
         "main weight rounded with GPTQ against the calibration Hessian, packed as op inputs",
         "gptq", "weight_quant gptq", lambda c, o: c.weight_quant == "gptq",
         lambda ctx: _p("GPTQPass")(ctx.plan, progress=ctx.progress,
                                    mapper=ctx.group_mapper)),
    Step("quantize", "QuantizeWeightsPass",
         "main weight rounded to nearest, packed as op inputs", "quantization",
         "weight_quant rtn", lambda c, o: c.weight_quant == "rtn",
         lambda ctx: _p("QuantizeWeightsPass")(ctx.plan, progress=ctx.progress)),
    Step("lowrank_factors", "LowRankFactorsPass",
         "L2QER's low-rank factors A, B of the activation-weighted rounding error",
         "quantization", "method l2qer", lambda c, o: c.method == "l2qer",
         lambda ctx: _p("LowRankFactorsPass")(ctx.plan)),
    Step("replace_matmul", "ReplaceMatMulPass",
         "each target MatMul becomes one SerqMatMul, absorbing run-time scale/permutation",
         "quantization", "always", _always, lambda ctx: _p("ReplaceMatMulPass")(ctx.plan)),
    Step("lowrank_branch", "LowRankBranchPass",
         "Y = SerqMatMul(X; Wq) + SerqMatMul(SerqMatMul(X; A); B) for L2QER", "quantization",
         "method l2qer", lambda c, o: c.method == "l2qer",
         lambda ctx: _p("LowRankBranchPass")(ctx.plan)),
    Step("fuse_siblings", "FuseSiblingsPass",
         "SerqMatMuls reading one activation (q/k/v, gate/up) fused into one plus a Split",
         "quantization", "--fuse (default; off with --no-fuse)", lambda c, o: o.fuse,
         lambda ctx: _p("FuseSiblingsPass")(ctx.plan)),
    Step("cleanup", "CleanupPass",
         "drop the float weights and absorbed run-time nodes left unused", "quantization",
         "always", _always, lambda ctx: _p("CleanupPass")()),
)


def steps_for(config: ConvertConfig, options: Options = Options(), *,
              phase: str | None = None) -> list[Step]:
    """The steps ``config`` runs, in order. ``phase``: ``"structure"`` (before calibration
    data is needed: fusing attention, finding targets), ``"transform"`` (the rest), or None
    (all)."""
    chosen = [s for s in STEPS if s.when(config, options)]
    if phase is None:
        return chosen
    split = next(i for i, s in enumerate(chosen) if s.name == "find_targets") + 1
    return chosen[:split] if phase == STRUCTURE else chosen[split:]


def _gram_note(step: str, config: ConvertConfig, plan: Plan | None) -> str:
    """How the Gram matrices are collected under ``config.gram_memory_mib``, for ``step``'s
    purpose ("" where there is nothing to add)."""
    if plan is None or config.weight_quant != "gptq" or not plan.groups:
        return ""
    chunks = plan.gram_chunks()
    if len(chunks) <= 1:
        return ""
    if step == "calibrate":
        return (f"; the Gram matrices exceed --gram-memory {config.gram_memory_mib:g} MiB, so "
                "only per-channel statistics here, and the float graph is kept on disk for GPTQ")
    if step == "gptq":
        return (f"; the Gram matrices collected in {len(chunks)} chunks of layer groups, one "
                "calibration pass each through the saved float graph cut after the chunk")
    return ""


def describe(config: ConvertConfig, options: Options = Options(),
             plan: Plan | None = None) -> list[dict]:
    """The steps of ``config`` as plain data: name, pass, purpose, when, preconditions.
    ``plan`` (its groups found): also say how the Gram matrices are collected."""
    return [dict(name=s.name, pass_name=s.pass_name,
                 purpose=(s.purpose if s.purpose else _fold_purpose(config))
                 + _gram_note(s.name, config, plan),
                 when=s.when_text, requires=s.requires())
            for s in steps_for(config, options)]


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (``getrusage``; 0 where unavailable)."""
    try:
        import resource
        import sys
    except ImportError:  # not on POSIX
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(steps: Sequence[Step], model: ir.Model, ctx: Context,
        timings: dict[str, float] | None = None,
        peak_rss: dict[str, float] | None = None) -> bool:
    """Run ``steps`` in order on ``model``; add each step's time to ``timings[step.stage]``
    and record the process's peak resident memory after it in ``peak_rss[step.name]`` (MiB:
    where a conversion's memory goes, for models near the machine's limit).

    Returns whether any pass modified the model. A pass's unmet precondition raises
    ``ir.passes.PreconditionError`` naming it; a ``SerqError`` passes through unchanged.
    The float graph that calibration may save for GPTQ's chunked Gram matrices
    (``plan.gram_source``) belongs to the run: it is removed when this returns or fails, so
    run calibration and GPTQ in one call.
    """
    modified = False
    try:
        for step in steps:
            if step.make is None:
                raise ValueError(f"step {step.name} is run by convert() itself, not by run()")
            t = time.perf_counter()
            pass_ = ctx.ran[step.name] = step.make(ctx)
            modified = pass_(model).modified or modified
            if timings is not None:
                timings[step.stage] = timings.get(step.stage, 0.0) + time.perf_counter() - t
            if peak_rss is not None:
                peak_rss[step.name] = round(peak_rss_mib(), 1)
    finally:
        if ctx.plan.gram_source is not None:
            ctx.plan.gram_source.close()
            ctx.plan.gram_source = None
    return modified
