"""Property tests: SerqMatMul in onnxruntime against ``reference.serq_matmul`` on random
layouts, shapes and values (tests/op_fuzz_cases.py), on every instruction set this CPU has.

Each example runs once per instruction set (``$SERQ_ONNX_ISA`` caps the kernel's choice). Every
result must match the reference within the float32 rounding bound (op_models.tolerance), and the
instruction sets must agree bit for bit: they compute the same exact integer block sums and
combine them with the same float operations in the same order.

The example count is fixed and the examples derandomized, so CI runs the same cases every time;
``SERQ_FUZZ_EXAMPLES=N`` runs more and ``SERQ_FUZZ_SEED=S`` draws other ones (``make fuzz``).
``SERQ_FUZZ_REPORT=path`` writes the per-kernel counts as JSON.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
ort = pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, given, settings  # noqa: E402

import serq_onnx  # noqa: E402
from op_fuzz_cases import FuzzCase, fuzz_cases  # noqa: E402
from op_isa import cpu_isas, expected_kernel, session_with_isa  # noqa: E402
from op_models import check_close, feeds, make_model, session  # noqa: E402

EXAMPLES = int(os.environ.get("SERQ_FUZZ_EXAMPLES") or 300)
SEED = os.environ.get("SERQ_FUZZ_SEED")
ISAS = cpu_isas()

FUZZ = settings(max_examples=EXAMPLES, derandomize=SEED is None, database=None, deadline=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz(fn):
    fn = FUZZ(fn)
    return hypothesis.seed(int(SEED))(fn) if SEED is not None else fn


STATS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _needs_library():
    try:
        serq_onnx.get_library_path()
    except serq_onnx.SerqError as e:
        pytest.fail(f"the op library is missing: {e}")


def _run_all_isas(fc: FuzzCase, label: str) -> dict:
    case, A = fc.case, fc.A
    sym = [f"d{i}" for i in range(A.ndim - 1)] + [case.layout.K]
    model = make_model(case, sym, A.dtype, fed=fc.fed)
    outs = {}
    for cap in ISAS:
        sess, used = session_with_isa(lambda: session(model), cap)
        assert used == expected_kernel(cap, case.layout.bits_w, case.layout.block), (cap, used)
        outs[cap] = sess.run(None, feeds(case, A, fc.fed))[0]
        STATS[f"{label} cap={cap} kernel={used}"] += 1
    return outs


@_fuzz
@given(fc=fuzz_cases())
def test_op_matches_reference(fc):
    """The op equals the reference within the rounding bound, bitwise equal across isas."""
    outs = _run_all_isas(fc, "examples")
    try:
        check_close(fc.case, fc.A, outs["scalar"], fc.A.dtype)
        for cap, y in outs.items():
            np.testing.assert_array_equal(y, outs["scalar"], err_msg=f"{cap} != scalar")
    except AssertionError as e:
        raise AssertionError(f"{fc.describe()}: {e}") from None


def test_every_isa_kernel_ran(capsys):
    """The fuzz set really reached each SIMD micro-kernel this CPU has (not only fallbacks).
    Prints, and with SERQ_FUZZ_REPORT writes, how many examples ran on which kernel."""
    if not STATS:
        pytest.skip("test_op_matches_reference did not run in this session")
    with capsys.disabled():
        print(f"\n[SerqMatMul fuzz] cpu isas {ISAS}, library {serq_onnx.get_library_path()}")
        for k, v in sorted(STATS.items()):
            print(f"  {k}: {v}")
    path = os.environ.get("SERQ_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"isas": ISAS, "library": serq_onnx.get_library_path(),
                       "counts": dict(STATS)}, f, indent=1)
    used = {k.split("kernel=")[1] for k in STATS}
    assert used == set(ISAS), f"kernels used {sorted(used)}, cpu has {ISAS}"
