"""Sizes of the GPU kernels' buffers for one SerqMatMul, derived from ``reference.Layout``.

Plain integer arithmetic with no Triton or torch import: the C++ launcher computes the same
numbers (the manifest written by :mod:`.aot` documents them), and the tests check both against
the reference.

Two paths:

* ``fast`` (4-bit weights, blocks a multiple of 32): int8 tensor-core GEMM over the repacked
  weight of :mod:`.repack`. The K loop steps over *pairs* of ``2 * half`` extended rows; the
  epilogue runs once per *unit* of ``unit`` rows, a divisor of the block, so activation scale,
  zero point, weight scale and ``wsum`` are constant inside a unit. The extended K is padded
  to ``KX``, a multiple of the pair, with rows that contribute exactly 0.
* ``generic`` (anything else the contract allows: 8-bit weights, blocks of 2..16 or not a
  multiple of 32): CUDA-core kernel over the reference ``B`` itself, units of one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from serq_onnx import reference as ref

# unit -> (half, units per pair): half is the K extent of each of the two MMAs of a pair.
FAST_UNITS = {128: (64, 1), 64: (32, 1), 32: (32, 2)}


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class KernelLayout:
    """Buffer geometry of the kernels for ``layout`` (a ``reference.Layout``)."""

    layout: ref.Layout

    @property
    def path(self) -> str:
        L = self.layout
        return "fast" if L.bits_w == 4 and L.block % 32 == 0 else "generic"

    @property
    def unit(self) -> int:
        """Rows per epilogue unit (activation and weight parameters constant inside)."""
        if self.path == "generic":
            return self.layout.block
        return next(u for u in FAST_UNITS if self.layout.block % u == 0)

    @property
    def half(self) -> int:
        """K extent of one MMA (fast path); a pair is ``2 * half`` rows."""
        return FAST_UNITS[self.unit][0] if self.path == "fast" else 0

    @property
    def units_per_pair(self) -> int:
        return FAST_UNITS[self.unit][1] if self.path == "fast" else 0

    @property
    def pair(self) -> int:
        return 2 * self.half

    @property
    def KX(self) -> int:
        """Row length of the activation code buffer (and weight rows after repack)."""
        L = self.layout
        return _ceil_to(L.K_ext, self.pair) if self.path == "fast" else L.K_ext

    @property
    def n_units(self) -> int:
        return self.KX // self.unit

    @property
    def n_pairs(self) -> int:
        return self.KX // self.pair if self.path == "fast" else 0

    @property
    def group_a_eff(self) -> int:
        return self.layout.group_a_eff

    @property
    def n_groups(self) -> int:
        """Activation groups per row (the last may be partial)."""
        return -(-self.layout.K // self.group_a_eff)

    @property
    def code_offset(self) -> int:
        """Stored code = q - offset: 8-bit unsigned codes shifted into int8's range."""
        return 128 if self.layout.bits_a == 8 else 0

    @property
    def qmax(self) -> int:
        return 2**self.layout.bits_a - 1


def param_stride(M: int) -> int:
    """Row stride of the per-unit activation parameters ``[n_units, ldp]`` (>= M)."""
    return max(16, _ceil_to(M, 16))
