"""Malformed SerqMatMul models (tests/op_malformed_cases.py) through onnxruntime, each a clean
error naming the problem, never a crash or a silent result.

The cases run in worker processes, so a crash (segfault, abort, a sanitizer report) cannot take
pytest down: it fails the case that was running, and a new worker carries on after it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import serq_onnx  # noqa: E402
from op_malformed_cases import CASES  # noqa: E402

WORKER = Path(__file__).with_name("op_malformed_cases.py")


def _run_workers(names: list[str], **env) -> dict[str, dict]:
    results: dict[str, dict] = {}
    pending = list(names)
    while pending:
        proc = subprocess.run([sys.executable, str(WORKER), *pending], capture_output=True,
                              text=True, timeout=900, env={**os.environ, **env})
        running = None
        for line in proc.stdout.splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in d:
                running = d["start"]
            else:
                results[d["name"]] = d
                running = None
        left = [n for n in pending if n not in results]
        if proc.returncode == 0 and not left:
            break
        victim = running or (left[0] if left else None)
        if victim is None:
            break
        results[victim] = {"name": victim, "ok": False, "crashed": True, "stage": "crash",
                           "why": f"the worker process died (exit status {proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}"}
        pending = [n for n in left if n != victim]
    return results


@pytest.fixture(scope="module")
def results():
    try:
        serq_onnx.get_library_path()
    except serq_onnx.SerqError as e:
        pytest.fail(f"the op library is missing: {e}")
    return _run_workers(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_malformed(name, results):
    r = results.get(name)
    assert r is not None, f"{name} produced no result"
    assert r["ok"], f"{name} ({r.get('info')}): {r['why']}\nonnxruntime said: {r.get('message')}"


def test_malformed_summary(results, capsys):
    """Prints the figures; no case may have crashed its worker."""
    by_stage = collections.Counter(r["stage"] for r in results.values())
    crashed = [n for n, r in results.items() if r.get("crashed")]
    with capsys.disabled():
        print(f"\n[SerqMatMul malformed] {len(results)} cases ({len(CASES)} defined): "
              f"errors at session creation {by_stage['create']}, at run {by_stage['run']}, "
              f"results checked against the reference {by_stage['ok']}, crashes {len(crashed)}; "
              f"library {serq_onnx.get_library_path()}")
    assert len(results) == len(CASES)
    assert not crashed, f"worker crashed in {crashed}"


def test_a_crash_fails_its_case_and_the_rest_still_run():
    names = list(CASES)[:3]
    res = _run_workers(names, SERQ_MALFORMED_ABORT_AT=names[1])
    assert res[names[1]]["crashed"] and not res[names[1]]["ok"]
    assert res[names[0]]["ok"] and res[names[2]]["ok"], res
