"""Launch configurations per shape class, chosen ahead of time (data, not code paths).

The AOT build compiles one cubin per (config, unit, output dtype); the launcher picks the class
by M and the split-K factor by :func:`split_k`. The same table is written into the manifest.
Tile sizes were chosen so the hot loops do not spill on sm_80/89/90 (checked by the tests with
``cuobjdump -res-usage``): the float32 accumulator and the int32 MMA result of a unit are both
live, so 128x128 tiles (8 warps) and 128x64 (4 warps) spill; 64x128 with 4 warps fits but sits
at 255 registers (and spills 8 bytes with Triton 3.6 on sm_90), with 8 warps it needs 160-232;
64x64 and 16x64 with 4 warps need 168 and 56-80. They are starting points to tune on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GemmConfig:
    """One shape class of the fast GEMM: used for ``M <= m_max`` (0: any M)."""

    name: str
    m_max: int
    BM: int
    BN: int
    num_warps: int
    num_stages: int
    max_split: int  # split-K factor cap (1: no split)

    def as_dict(self) -> dict:
        return asdict(self)


# Ordered by m_max; the last entry takes every larger M.
GEMM_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig("decode", 16, 16, 64, 4, 4, 8),
    GemmConfig("small", 64, 64, 64, 4, 3, 4),
    GemmConfig("prefill", 0, 64, 128, 8, 3, 1),
)

GENERIC_CONFIG = dict(BM=32, BN=32, BK=16, num_warps=4, num_stages=2)
QUANT_CONFIG = dict(num_warps=4, num_stages=1)
# Activation quantization reads a group in chunks of CH channels: large chunks for whole-row
# groups (group_a = 0) so one program does few dependent loads, 128 otherwise.
QUANT_CHUNKS = (128, 1024)


def quant_chunk(group: int) -> int:
    """Chunk of the quantization variant for activation groups of ``group`` channels."""
    return QUANT_CHUNKS[1] if group >= QUANT_CHUNKS[1] else QUANT_CHUNKS[0]
REDUCE_CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=1)

# Split-K aims at this many programs (about two waves on a 132-SM H100), no fewer than
# MIN_PAIRS_PER_SPLIT pairs of K rows per program.
SPLIT_TARGET_PROGRAMS = 264
MIN_PAIRS_PER_SPLIT = 4


def gemm_config(M: int) -> GemmConfig:
    """The shape class for ``M`` rows."""
    for cfg in GEMM_CONFIGS:
        if cfg.m_max and M <= cfg.m_max:
            return cfg
    return GEMM_CONFIGS[-1]


def split_k(cfg: GemmConfig, M: int, N: int, n_pairs: int) -> tuple[int, int]:
    """``(n_split, pairs_per_split)``: enough programs to fill the GPU when M and N are small.

    ``n_split = min(max_split, ceil(target / tiles), n_pairs // MIN_PAIRS_PER_SPLIT)`` (>= 1),
    then trimmed so no split is empty.
    """
    tiles = max(1, -(-M // cfg.BM) * -(-N // cfg.BN))
    want = -(-SPLIT_TARGET_PROGRAMS // tiles)
    n = max(1, min(cfg.max_split, want, n_pairs // MIN_PAIRS_PER_SPLIT))
    per = -(-n_pairs // n) if n_pairs else 1
    return -(-n_pairs // per) if n_pairs else 1, per
