"""Error bound of the GPU kernels against the float64 reference, shared by the kernel tests."""

from __future__ import annotations

import numpy as np
from op_models import Case, abs_terms, reference64

from serq_onnx.kernels.layout import KernelLayout

# Relative half-ulp of the output dtypes; the Triton interpreter's float32 -> bfloat16
# conversion does not round to nearest, so under it bfloat16 gets a whole ulp (2^-7).
HALF_ULP = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
INTERPRETER_HALF_ULP = {**HALF_ULP, "bfloat16": 2.0**-7}


# Split-K partials each add a rounding; launches that pick their own split use at most this.
MAX_SPLIT = 8


def tolerance(case: Case, A: np.ndarray, out: str, n_split: int = MAX_SPLIT,
              half_ulp: dict = HALF_ULP) -> np.ndarray:
    """|kernel - exact| bound from float32 arithmetic. Fast path: per unit, sa*sw, the int ->
    float conversion and the product round once each (the integer sum is exact), then one
    rounding per unit and per split-K partial added: n_units + n_split + 5 roundings of at most
    u = 2^-24 of the absolute terms. Generic path: every extended row is a float32 term, so
    K_ext + 5. A float16 / bfloat16 output adds its half-ulp (and doubles the float32 part,
    which the rounding may amplify across a binade)."""
    kl = KernelLayout(case.layout)
    u = 2.0**-24
    n = (kl.n_units + n_split + 5) if kl.path == "fast" else (kl.layout.K_ext + 5)
    tol = n * u * abs_terms(case, A)
    if case.bias is not None:
        tol = tol + u * np.abs(case.bias.astype(np.float64))
    rel = half_ulp[out]
    exact = np.nan_to_num(reference64(case, A))
    return tol * (2 if rel else 1) + rel * np.abs(exact) + u * rel + 1e-30


def check(case: Case, A: np.ndarray, y: np.ndarray, out: str, n_split: int = MAX_SPLIT,
          half_ulp: dict = HALF_ULP) -> None:
    """``y`` (as float64) has the reference's shape and NaNs and lies within :func:`tolerance`."""
    exact = reference64(case, A)
    assert tuple(y.shape) == exact.shape
    y = np.asarray(y, np.float64)
    nan = np.isnan(exact)
    np.testing.assert_array_equal(np.isnan(y), nan)
    err = np.abs(y - exact)[~nan]
    tol = tolerance(case, A, out, n_split, half_ulp)[~nan]
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
