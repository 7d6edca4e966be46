"""``convert --ray``: calibration and GPTQ on a real local Ray cluster give the one-process model.

One local Ray instance (2 CPUs, loopback) serves the module: two calibration actors and two
GPTQ tasks at a time. The comparisons are bit-for-bit: the driver sums every sequence's
statistics in sequence order as one process does, and GPTQ is deterministic numpy code on the
same numpy build (see serq_onnx/distributed.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import pytest

from serq_onnx import distributed
from serq_onnx.converter import convert
from serq_onnx.errors import SerqError
from serq_onnx.ray_cluster import LOOPBACK_ENV

SETTINGS = dict(rank=16, group_w=32, group_a=32, fuse_attention=False, verify=False,
                progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault(LOOPBACK_ENV, "0")  # before ray is imported: 127.0.0.1 only
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    from serq_onnx.ray_cluster import neutral_cwd

    with neutral_cwd():  # as convert --ray starts Ray: workers import the installed package
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    print(f"\nlocal Ray started in {time.perf_counter() - t0:.1f} s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def calib_ids(tiny_llama):
    rng = np.random.default_rng(11)
    return [rng.integers(0, tiny_llama.config["vocab_size"], 64, dtype=np.int64)
            for _ in range(5)]


@pytest.fixture(scope="module")
def local_model(tiny_llama, calib_ids, tmp_path_factory):
    """The one-process conversion: what every Ray conversion must equal."""
    out = tmp_path_factory.mktemp("local") / "out"
    convert(tiny_llama.onnx_path, out, calib_ids=calib_ids, **SETTINGS)
    return out


def _initializers(folder) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_same_model(got, want) -> None:
    a, b = _initializers(got), _initializers(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"{len(differ)} of {len(a)} initializers differ, e.g. {differ[:3]}"
    assert (onnx.load(str(got / "model.onnx"), load_external_data=False).graph ==
            onnx.load(str(want / "model.onnx"), load_external_data=False).graph)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_auto_starts_local_ray_and_equals_local(tiny_llama, tmp_path):
    """``serq-onnx convert --ray auto`` starts its own local instance (first in this module,
    before the fixture's), converts and shuts it down: the same model as without ``--ray``
    (both calibrated on the same seeded random tokens)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    outs = {}
    for name, extra in (("ray", ["--ray", "auto"]), ("local", [])):
        outs[name] = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "serq_onnx.cli", "convert", str(tiny_llama.onnx_path), "-o",
             str(outs[name]), "--rank", "16", "--group-w", "32", "--group-a", "32",
             "--calib-samples", "3", "--calib-seqlen", "64", "--no-fuse-attention",
             "--no-verify", "-q", *extra],
            capture_output=True, text=True, timeout=240, env=env, cwd=tempfile.gettempdir())
        assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_model(outs["ray"], outs["local"])


def test_cli_unreachable_address_one_line(tiny_llama, tmp_path):
    out = tmp_path / "out"
    address = f"127.0.0.1:{_free_port()}"
    proc = subprocess.run([sys.executable, "-m", "serq_onnx.cli", "convert",
                           str(tiny_llama.onnx_path), "-o", str(out), "--ray", address],
                          capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serq-onnx: error: cannot reach a Ray "
                                                  f"cluster at {address}"), proc.stderr
    assert not out.exists()


def test_statistics_bit_equal(local_ray, tiny_llama, calib_ids):
    """absmax, Gram matrices (summed in GRAM_DTYPE) and |x| sums from the Ray actors equal the
    one-process ones bit for bit: the merge is the same ordered sum."""
    from serq_onnx import passes
    from serq_onnx.modelio import load_model
    from serq_onnx.plan import ConvertConfig, Plan

    def stats(runner):
        model = load_model(tiny_llama.onnx_path)
        plan = Plan(ConvertConfig(method="l2qer", weight_quant="gptq", lm_head="float"))
        passes.FindTargetsPass(plan)(model)
        passes.CalibratePass(plan, calib_ids, progress=False, runner=runner)(model)
        return plan.groups

    with distributed.cluster("auto") as cluster:
        got = stats(cluster.calib_runner)
        assert cluster.workers == 2 and not cluster.started  # the fixture's instance, kept
    want = stats(None)
    assert local_ray.is_initialized()
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens == 5 * 64
        for field in ("absmax", "gram", "absmean"):
            x, y = getattr(g, field), getattr(w, field)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (g.name, field)


def test_ray_conversion_equals_local(local_ray, tiny_llama, calib_ids, local_model, tmp_path):
    t0 = time.perf_counter()
    report = convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib_ids, ray="auto",
                     **SETTINGS)
    print(f"\nRay conversion: {time.perf_counter() - t0:.1f} s ({report.timings})")
    _assert_same_model(tmp_path / "out", local_model)


@pytest.mark.parametrize("fail", ["calibrate:3", "gptq:1", "gptq:0:memory"])
def test_worker_failure_clear_error_no_output_rerun_equal(local_ray, tiny_llama, calib_ids,
                                                          local_model, tmp_path, monkeypatch,
                                                          fail):
    """A worker that dies (exits mid-task) or runs out of memory: a SerqError naming the
    sequence or group, no output folder, and a rerun gives the one-process model."""
    out = tmp_path / "out"
    monkeypatch.setenv(distributed.FAIL_ENV, fail)
    stage, index = fail.split(":")[:2]
    what = {"calibrate": "calibration sequence", "gptq": "GPTQ group"}[stage]
    happened = "ran out of memory" if fail.endswith("memory") else "lost its Ray worker"
    if stage == "calibrate":
        # The actor that exits may take the reply of its previous sequence with it (sequence
        # 1: 2 actors, dealt round robin); either is named, whichever the driver waits on.
        index = f"({int(index) - 2}|{index})"
    with pytest.raises(SerqError, match=f"{what} {index}\\b.* {happened}.*nothing was written"):
        convert(tiny_llama.onnx_path, out, calib_ids=calib_ids, ray="auto", **SETTINGS)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder left either
    monkeypatch.delenv(distributed.FAIL_ENV)
    convert(tiny_llama.onnx_path, out, calib_ids=calib_ids, ray="auto", **SETTINGS)
    _assert_same_model(out, local_model)


def test_unreachable_address_fails_fast(tiny_llama, calib_ids, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(SerqError, match=f"cannot reach a Ray cluster at {address}.*--ray"):
        convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib_ids, ray=address,
                **SETTINGS)
    assert time.perf_counter() - t0 < 10  # one TCP connection, refused; no model loaded
    assert not (tmp_path / "out").exists()
    with pytest.raises(SerqError, match="--ray 'nohost' is not HOST:PORT"):
        convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib_ids, ray="nohost",
                **SETTINGS)



def test_calibration_workers_open_their_sessions_as_the_driver_asks(tiny_llama, monkeypatch):
    """``low_memory`` reaches the Ray actors: each worker's session maps its weights too."""
    from serq_onnx.passes import calibrate

    seen = []
    monkeypatch.setattr(calibrate, "statistics_session",
                        lambda path, names, threads=0, prepack=True: seen.append(prepack))
    files = {"model.onnx": tiny_llama.onnx_path.read_bytes()}
    for prepack in (True, False):
        distributed._CalibWorker(files, "model.onnx", ["logits"], prepack)
    assert seen == [True, False]
