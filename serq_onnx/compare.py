"""Running a causal LM on a few tokens and comparing two models' logits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .cache_dims import with_cache_dims
from .evaluate import causal_lm_spec, prefill_feed


@dataclass
class LogitDiff:
    max_abs: float
    rel_rms: float  # rms(a - b) / rms(b)
    top1_agree: float  # fraction of positions with the same argmax

    def __str__(self) -> str:
        return (f"max |diff| {self.max_abs:.3g}, relative rms {self.rel_rms:.3g}, "
                f"top-1 agreement {self.top1_agree:.1%}")


def session_options(prepack: bool = True):
    """Quiet session options. ``prepack`` False (``ConvertConfig.low_memory``): a session adds
    little memory of its own. onnxruntime then keeps the float weights where the model file
    maps them (external data) instead of copying them into its prepacked GEMM layout; runs
    no graph optimizations, so that the casts it inserts in front of FP16 nodes its CPU
    provider lacks stay casts at run time instead of float32 copies of the weights folded in
    (measured on an FP16 0.47B Llama: 2002 -> 369 MiB after a 256-token pass, 1.2-1.3x its
    time; float32 graphs: the same memory and time); and returns freed buffers instead of
    keeping them in an arena."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    return so


def cpu_session(path: str | os.PathLike, with_ops: bool = False, prepack: bool = True):
    import onnxruntime as ort

    so = session_options(prepack)
    if with_ops:
        from .library import session_options as with_op_library

        so = with_op_library(so)
    providers = ["CPUExecutionProvider"]
    return with_cache_dims(ort.InferenceSession(str(path), so, providers=providers), path, so,
                           providers)


def logits(session, ids: np.ndarray) -> np.ndarray:
    feed = prefill_feed(causal_lm_spec(session), np.asarray(ids, np.int64).reshape(-1))
    return session.run(["logits"], feed)[0].astype(np.float64)


def session_logits(session, sequences) -> np.ndarray:
    """The logits of every sequence, concatenated along the sequence axis; the session is
    dropped by the caller as soon as this returns (it may hold a whole float model)."""
    return np.concatenate([logits(session, s) for s in sequences], axis=1)


def diff(a: np.ndarray, b: np.ndarray) -> LogitDiff:
    d = a - b
    rms_b = float(np.sqrt(np.mean(b * b))) or 1.0
    return LogitDiff(max_abs=float(np.abs(d).max()),
                     rel_rms=float(np.sqrt(np.mean(d * d))) / rms_b,
                     top1_agree=float(np.mean(a.argmax(-1) == b.argmax(-1))))
