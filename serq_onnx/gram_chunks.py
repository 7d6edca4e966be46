"""Which groups' GPTQ Gram matrices are collected together, under a memory budget.

Each input group's Gram matrix is ``K x K`` float32 (``passes.calibrate.GRAM_DTYPE``). For a
Llama-3-8B that is 32 layers x (3 * 4096^2 + 14336^2) x 4 B, about 32 GB: more than the model.
When every group's Gram matrix fits ``ConvertConfig.gram_memory_mib``, calibration collects
them all in its one pass over the calibration text, as it always did. When they do not, the
groups are cut, in graph order, into chunks whose Gram matrices fit the budget; calibration then
collects only the per-channel statistics, and ``GPTQPass`` runs the calibration text once more
per chunk through the float graph cut after that chunk's deepest group, quantizing each chunk
before the next is collected. Each pass starts from the tensors the one before handed on
(``serq_onnx.graph_cut``), so all of them together run the float graph about once. The sums
are the same float32 additions in the same order either way, so the model is bit-identical;
the price is about one more forward pass over the calibration text, and disk for the tensors
handed on between two passes.

A group whose Gram matrix alone exceeds the budget is a chunk by itself (the budget cannot be
met, and refusing would only stop the conversion); so a budget of 0 collects one group at a
time. ``inf`` never cuts. Unless given, the budget is :func:`default_budget` of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import SerqError

# The default budget (default_budget): a quarter of the float model's bytes, within these
# bounds. Summing holds about 2.75x the budget (11 bytes per 4-byte entry, RESULTS-scale.md)
# and GPTQ's sweep at most 0.89x the model besides, so a quarter keeps the sweep near the
# float checks' 1.17x; for a Llama the Gram matrices are about 1.2x its weights, so that is
# about five chunks, which cost little once each pass starts where the one before stopped
# (float32 graphs). The floor keeps small models in one pass (SmolLM2-135M: 381 MiB of Gram
# matrices); the cap bounds the Gram term of large ones (an 8B: 30 GiB of them, 8 chunks).
DEFAULT_GRAM_MEMORY_MIB = 4096.0
GRAM_MEMORY_FLOOR_MIB = 512.0
GRAM_MEMORY_MODEL_FRACTION = 0.25
# With --low-memory the float checks hold 0.26x the model (anonymous) and the sweep 0.10x
# besides its Gram matrices (0.47B Llama), so a sixteenth keeps the two near each other.
GRAM_MEMORY_MODEL_FRACTION_LOW = 1 / 16
GRAM_BYTES_PER_ENTRY = 4  # float32, as passes.calibrate.GRAM_DTYPE
MIB = 1024 * 1024


def default_budget(model_bytes: int, low_memory: bool = False) -> float:
    """The Gram budget (MiB) for a float model of ``model_bytes``: see
    :data:`GRAM_MEMORY_MODEL_FRACTION` (:data:`GRAM_MEMORY_MODEL_FRACTION_LOW` with
    ``low_memory``)."""
    share = GRAM_MEMORY_MODEL_FRACTION_LOW if low_memory else GRAM_MEMORY_MODEL_FRACTION
    mib = share * model_bytes / MIB
    return float(round(min(max(mib, GRAM_MEMORY_FLOOR_MIB), DEFAULT_GRAM_MEMORY_MIB)))


def check_budget(mib: object) -> float:
    """``mib`` as a float, or a SerqError saying what a budget may be."""
    if isinstance(mib, bool) or not isinstance(mib, (int, float)) or math.isnan(mib) or mib < 0:
        raise SerqError(f"--gram-memory must be a number of MiB >= 0 (0: one layer group at a "
                        f"time, inf: never split), got {mib!r}")
    return float(mib)


def gram_nbytes(K: int) -> int:
    """Bytes of one group's Gram sum."""
    return GRAM_BYTES_PER_ENTRY * K * K


def plan_chunks(ks: Sequence[int], budget_mib: float) -> list[list[int]]:
    """Group indices, in order, cut into consecutive chunks whose Gram matrices (``K^2``
    float32 each, ``ks`` in graph order) fit ``budget_mib``; a group over the budget alone is
    a chunk. One chunk of everything when all fit; none for no groups."""
    budget = check_budget(budget_mib) * MIB
    chunks: list[list[int]] = []
    used = 0
    for i, K in enumerate(ks):
        size = gram_nbytes(K)
        if chunks and used + size <= budget:
            chunks[-1].append(i)
            used += size
        else:
            chunks.append([i])
            used = size
    return chunks


def calibration_passes(n_chunks: int) -> int:
    """Runs over the calibration text: one when the Gram matrices are collected with the
    per-channel statistics (or none are needed), else that one plus one per chunk."""
    return 1 if n_chunks <= 1 else 1 + n_chunks
