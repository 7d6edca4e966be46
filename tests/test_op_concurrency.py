"""Isolation of SerqMatMul sessions: concurrent runs of one session, and session churn.

onnxruntime lets several threads call ``run`` on one session at once; the kernel keeps no
per-call state in the kernel object (Compute is const, scratch is per call), so concurrent
results must be bit-identical to sequential ones. Sessions created and dropped must give their
memory back: a leaked kernel or session would show up in the process's resident set.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
psutil = pytest.importorskip("psutil")

from op_models import check_close, feeds, make_model, random_case, session  # noqa: E402

THREADS = 8
ROUNDS = 6


def _inputs(K, seed):
    rng = np.random.default_rng(seed)
    # one row (the decode path), a few rows, many rows (several tiles and tasks)
    return [rng.standard_normal(shape).astype(np.float32) * 3
            for shape in ((1, 1, K), (1, 5, K), (2, 19, K))]


@pytest.mark.parametrize("fed", [(), ("B", "scales", "wsum", "act_perm")],
                         ids=["constant_weights", "fed_weights"])
def test_threads_share_a_session_bitwise(fed):
    """8 threads x ROUNDS runs each, every thread its own inputs, all at once: each output equals
    the single-threaded output for the same input, bit for bit."""
    case = random_case(320, 72, 64, 64, 32, 4, 8, seed=41, act_scale=True, act_perm=np.int64,
                       bias=True)
    sess = session(make_model(case, ["S", "M", 320], fed=fed))
    per_thread = [_inputs(320, seed) for seed in range(THREADS)]
    expected = [[sess.run(None, feeds(case, a, fed))[0] for a in ins] for ins in per_thread]
    for ins, outs in zip(per_thread, expected):
        for a, y in zip(ins, outs):
            check_close(case, a, y)

    start = threading.Barrier(THREADS)
    failures: list[str] = []

    def worker(t):
        try:
            start.wait()
            for r in range(ROUNDS):
                for i, a in enumerate(per_thread[t]):
                    y = sess.run(None, feeds(case, a, fed))[0]
                    if not np.array_equal(y, expected[t][i]):
                        failures.append(f"thread {t} round {r} input {i} differs")
        except Exception as e:  # noqa: BLE001 -- reported below
            failures.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures[:5]


# A layer whose session state is large enough for a per-session leak to stand out: B, scales,
# wsum and the checked act_perm come to ~1.2 MB per session, the kernel's own copy of act_perm
# alone to 64 KB.
CHURN_SESSIONS = 200
WARMUP = 20
BOUND_MB = 4.0


def _rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


def _under_asan() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.skipif(_under_asan(), reason="AddressSanitizer's quarantine keeps freed memory resident")
def test_session_churn_keeps_memory_flat(capsys):
    """200 sessions created, run once and dropped after a warm-up of 20 grow the resident set by
    less than 4 MB. A leak of one kernel (64 KB) per session would add 12.8 MB, a leaked
    session's weights far more; the control at the end holds 50 sessions alive and must grow
    by more than the bound, so the measurement can see what it is meant to catch."""
    K = 8192
    case = random_case(K, 64, 128, 128, 0, 4, 8, seed=43, act_perm=np.int64, bias=True)
    model = make_model(case, ["M", K])
    A = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)

    def one():
        s = session(model)
        s.run(None, {"A": A})

    for _ in range(WARMUP):
        one()
    before = _rss_mb()
    for _ in range(CHURN_SESSIONS):
        one()
    after = _rss_mb()
    held = []
    for _ in range(50):
        held.append(session(model))
        held[-1].run(None, {"A": A})
    control = _rss_mb() - after
    del held
    growth = after - before
    with capsys.disabled():
        print(f"\n[SerqMatMul churn] RSS {before:.1f} MB after {WARMUP} warm-up sessions, "
              f"{after:.1f} MB after {CHURN_SESSIONS} more: growth {growth:+.2f} MB "
              f"({growth * 1024 / CHURN_SESSIONS:+.1f} KB/session, bound {BOUND_MB} MB); "
              f"control, 50 sessions held: {control:+.1f} MB")
    assert growth < BOUND_MB
    assert control > BOUND_MB
