"""Hypothesis strategies for SerqMatMul inputs: every layout class the contract allows, weight
codes over the full code range, activations with NaN / inf rows, ties and extreme magnitudes.

Hypothesis draws the structure (sizes, groups, flags, magnitudes, which rows are special) and a
seed; numpy fills the bulk values from the seed. Examples stay reproducible and shrink on the
structure, and the arrays cost nothing to generate.

Magnitudes are bounded so that float32 cannot overflow anywhere in the kernel (|A| <= 1e24 with
outliers, act_scale <= 4, weight scales <= 2^10, codes <= 128, K_ext <= 768: every partial sum
stays below ~1e33, far from float32's 3.4e38) -- beyond that the contract's "float32
accumulation" leaves the result undefined. float16 outputs do overflow (to inf), and
:func:`op_models.check_close` checks that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from op_models import Case
from serq_onnx import reference as ref

# Sizes the SIMD kernels take (blocks of 32 and 64 codes) are drawn more often.
GROUP_W = (2, 4, 6, 8, 10, 12, 16, 32, 64, 128, 32, 64, 128, 64, 128)
MAX_K = 300


@dataclass
class FuzzCase:
    case: Case
    A: np.ndarray
    fed: tuple[str, ...]  # inputs fed at run time instead of constant initializers

    def describe(self) -> str:
        L = self.case.layout
        opt = [k for k, v in self.case.optional_inputs().items() if v is not None]
        return (f"K={L.K} N={L.N} rank={L.rank} group_w={L.group_w} group_a={L.group_a} "
                f"bits_w={L.bits_w} bits_a={L.bits_a} A={self.A.dtype}{list(self.A.shape)} "
                f"optional={opt} fed={list(self.fed)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layouts(draw) -> ref.Layout:
    group_w = draw(st.sampled_from(GROUP_W))
    kind = draw(st.sampled_from(("whole_row", "multiple", "divisor")))
    if kind == "whole_row":
        group_a = 0
    elif kind == "multiple":
        group_a = group_w * draw(st.integers(1, 3))
    else:
        group_a = draw(st.sampled_from(_divisors(group_w)))  # includes odd ones (1, 3, 5)
    K = draw(st.one_of(
        st.integers(1, 24),
        st.integers(1, MAX_K),
        # around multiples of the groups, where padding starts or vanishes
        st.builds(lambda m, d: max(1, min(MAX_K, m * group_w + d)),
                  st.integers(1, max(1, MAX_K // group_w)), st.integers(-1, 1)),
    ))
    rank = draw(st.one_of(st.just(0), st.just(K), st.integers(0, K)))
    N = draw(st.one_of(st.integers(1, 9), st.integers(1, 40)))
    bits_w = draw(st.sampled_from((4, 8)))
    bits_a = draw(st.sampled_from((4, 8)))
    return ref.Layout(K=K, N=N, rank=rank, group_w=group_w, group_a=group_a, bits_w=bits_w,
                      bits_a=bits_a)


def _weights(rng, L: ref.Layout, code_kind: str, scale_exp: tuple[int, int], pad_codes: bool):
    lo, hi = -(2 ** (L.bits_w - 1)), 2 ** (L.bits_w - 1) - 1
    if code_kind == "extremes":
        codes = rng.choice(np.array([lo, hi], np.int8), (L.N, L.K_ext))
    elif code_kind == "sparse":
        codes = rng.integers(lo, hi + 1, (L.N, L.K_ext)) * (rng.random((L.N, L.K_ext)) < 0.1)
    else:
        codes = rng.integers(lo, hi + 1, (L.N, L.K_ext))
    codes = codes.astype(np.int8)
    if not pad_codes:  # the converter's layout; the op must ignore padding codes either way
        codes[:, L.K : L.K_pad] = 0
        codes[:, L.K_pad + L.rank :] = 0
    scales = np.exp2(rng.uniform(*scale_exp, (L.N, L.K_ext // L.group_w))).astype(np.float32)
    return ref.pack_weight_codes(codes, L.bits_w), scales, ref.block_sums(codes, L.block)


ROW_KINDS = ("normal", "normal", "normal", "zero", "constant", "ties", "outlier", "nan", "inf",
             "-inf", "tiny")


def _row(rng, kind: str, K: int, bits_a: int, mag: float) -> np.ndarray:
    if kind == "zero":
        return np.zeros(K)
    if kind == "constant":
        return np.full(K, rng.standard_normal() * mag)
    if kind == "ties":
        # integers and half-integers over a range of exactly qmax: scale 1, many rint ties
        qmax = 2**bits_a - 1
        z = int(rng.integers(0, qmax + 1))
        x = np.clip(rng.integers(-z, qmax - z + 1, K) + rng.choice([0.0, 0.5], K), -z, qmax - z)
        x[rng.integers(0, K)], x[rng.integers(0, K)] = -z, qmax - z
        return x
    x = rng.standard_normal(K) * mag
    if kind == "tiny":
        return x * 1e-30 / mag
    if kind == "outlier":
        x[rng.integers(0, K)] *= 1e4
    elif kind in ("nan", "inf", "-inf"):
        x[rng.integers(0, K)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    return x


@st.composite
def fuzz_cases(draw) -> FuzzCase:
    L = draw(layouts())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a_dtype = draw(st.sampled_from((np.float32, np.float16)))
    f16 = a_dtype is np.float16

    lead = tuple(draw(st.lists(st.integers(0, 6), max_size=2)))
    if draw(st.integers(0, 5)) == 0:  # sometimes many rows: several row tiles and tasks
        lead = (draw(st.integers(7, 40)),)
    M = int(np.prod(lead)) if lead else 1

    code_kind = draw(st.sampled_from(("uniform", "uniform", "extremes", "sparse")))
    lo_exp = draw(st.integers(-20, 8))
    scale_exp = (lo_exp, min(10, lo_exp + draw(st.integers(0, 6))))
    if f16:  # keep most float16 outputs finite; larger ones overflow to inf, checked too
        scale_exp = (min(scale_exp[0], -4) - 6, min(scale_exp[0], -4))
    B, scales, wsum = _weights(rng, L, code_kind, scale_exp, draw(st.booleans()))
    case = Case(L, B, scales, wsum)

    mag = 10.0 ** draw(st.integers(-6, 4) if f16 else st.integers(-20, 20))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=M, max_size=M))
    A = np.stack([_row(rng, k, L.K, L.bits_a, mag) for k in kinds]) if M else np.zeros((0, L.K))
    with np.errstate(over="ignore"):  # float16: large values become inf
        A = A.reshape(lead + (L.K,)).astype(a_dtype)

    if draw(st.booleans()):
        s = rng.uniform(0.25, 4.0, L.K)
        if draw(st.integers(0, 4)) == 0:
            s[rng.integers(0, L.K)] = 0.0
        case.act_scale = s.astype(np.float32)
    perm = draw(st.sampled_from((None, np.int32, np.int64)))
    if perm is not None:
        order = draw(st.sampled_from(("random", "identity", "reversed")))
        p = {"random": rng.permutation(L.K), "identity": np.arange(L.K),
             "reversed": np.arange(L.K)[::-1]}[order]
        case.act_perm = np.ascontiguousarray(p).astype(perm)
    if draw(st.booleans()):
        case.bias = (rng.standard_normal(L.N) * 10.0 ** draw(st.integers(-3, 3))).astype(np.float32)

    fed: tuple[str, ...] = ()
    if draw(st.integers(0, 3)) == 0:
        present = ["B", "scales", "wsum"] + [k for k, v in case.optional_inputs().items()
                                            if v is not None]
        fed = tuple(draw(st.lists(st.sampled_from(present), min_size=1, unique=True)))
    return FuzzCase(case, A, fed)
