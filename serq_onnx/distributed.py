"""``convert --ray``: calibration sequences and GPTQ groups on Ray workers, same model as one
process.

Calibration runs the float statistics graph on one Ray actor per CPU (each holds one
onnxruntime session, 1 intra-op thread), sequences dealt round robin; each sequence's outputs
come back to the driver, which sums them in sequence order exactly as ``CalibratePass`` does in
one process, so the sums are bit-equal. (Per-sequence results cost ``K^2`` floats per
group and sequence over the network: the price of the exact merge.) GPTQ runs one Ray task per
input group (1 CPU, so the worker's BLAS has 1 thread); each returns its codes and scales.
Results are taken in order with a bounded number in flight, so driver memory stays bounded.

Any worker failure (a crash, Ray's memory monitor, an exception) stops the conversion with a
:class:`SerqError` naming the sequence or group; ``convert`` writes its output only at the end,
so nothing is left behind, and since nothing here is random a rerun gives the same model.
Workers need the same serq-onnx, numpy and onnxruntime as the driver (checked on connecting):
other BLAS builds or CPUs may round differently.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import ray_cluster
from .errors import SerqError

FLAG = "--ray"
LOCAL_HINT = "use --ray auto for a local instance"
# Test hook: "calibrate:I" or "gptq:I" makes the worker running sequence / group I exit at once;
# "calibrate:I:memory" raises MemoryError there instead.
FAIL_ENV = "SERQ_ONNX_RAY_FAIL"
IN_FLIGHT_PER_WORKER = 2
PROBE_TIMEOUT_S = 120.0


def check_address(address: str | None) -> None:
    """Fail fast, before any model is loaded: a malformed or unreachable ``--ray`` address."""
    if address is None:
        return
    if not isinstance(address, str) or not address.strip():
        raise SerqError(f"{FLAG} takes HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    if address != "auto":
        ray_cluster.check_reachable(address, flag=FLAG, local_hint=LOCAL_HINT)


def _fail_hook(stage: str) -> tuple[int, str]:
    """The index the test hook fails at in ``stage`` (-1: none) and how."""
    parts = os.environ.get(FAIL_ENV, "").split(":")
    if len(parts) >= 2 and parts[0] == stage and parts[1].lstrip("-").isdigit():
        return int(parts[1]), (parts[2] if len(parts) > 2 else "exit")
    return -1, ""


def _maybe_fail(how: str) -> None:
    if how == "memory":
        raise MemoryError("injected by " + FAIL_ENV)
    if how:
        os._exit(1)


def _versions() -> dict[str, str]:
    import onnxruntime

    from . import __version__

    return {"serq-onnx": __version__, "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__}


class _CalibWorker:
    """A Ray actor: one onnxruntime session on the statistics graph, one sequence per call."""

    def __init__(self, files: dict[str, bytes], model_name: str, names: list[str],
                 prepack: bool = True):
        from serq_onnx.passes.calibrate import statistics_session

        with tempfile.TemporaryDirectory(prefix="serq-calib-worker-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.run_one = statistics_session(Path(tmp) / model_name, names, threads=1,
                                              prepack=prepack)

    def run(self, seq: np.ndarray, fail: str = "") -> list[np.ndarray]:
        _maybe_fail(fail)
        return self.run_one(seq)


def _gptq_task(fn: Callable, job: Any, fail: str = "") -> Any:
    _maybe_fail(fail)
    return fn(job)


class RayCluster:
    """A connected Ray: :meth:`calib_runner` and :meth:`group_mapper` for the passes."""

    def __init__(self, ray: Any, started: bool):
        self.ray, self.started = ray, started
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()

    def check_workers(self) -> None:
        """One task: the workers import serq-onnx, with the driver's versions."""
        probe = self.ray.remote(num_cpus=1, max_retries=0)(_versions)
        try:
            theirs = self.ray.get(probe.remote(), timeout=PROBE_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise SerqError(f"no Ray worker started within {PROBE_TIMEOUT_S:.0f} s: the cluster "
                            "may have no free CPU") from None
        except self.ray.exceptions.RayError as err:
            raise SerqError("a Ray worker cannot run serq-onnx (install the same serq-onnx "
                            f"on every node): {_first_line(err)}") from None
        ours = _versions()
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs.get(k)} (here {v})" for k, v in ours.items()
                             if theirs.get(k) != v)
            raise SerqError(f"the Ray workers run {diff}; the converted model would differ "
                            "from a one-process conversion. Install the same versions there")

    def calib_runner(self, path: Path, names: list[str], sequences: Sequence[np.ndarray], *,
                     prepack: bool = True) -> Iterator[list[np.ndarray]]:
        """A ``CalibratePass`` runner: each sequence's statistics, from the actors, in order."""
        ray = self.ray
        files = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()}
        model_ref = ray.put(files)  # read now: the file goes when this returns
        del files
        n = min(len(sequences), self.workers)
        actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_CalibWorker)
        actors = [actor.remote(model_ref, path.name, names, prepack) for _ in range(n)]
        at, how = _fail_hook("calibrate")

        def submit(i: int, seq: np.ndarray) -> Any:
            return actors[i % n].run.remote(seq, how if i == at else "")

        def kill(refs: list[Any]) -> None:  # actor tasks cannot be cancelled by force
            for a in actors:
                ray.kill(a)

        return self._in_order(submit, sequences, n, "calibration sequence", kill)

    def group_mapper(self, fn: Callable, jobs: Iterable[Any]) -> Iterator[Any]:
        """A ``GPTQPass`` mapper: ``fn(job)`` for each job as a 1-CPU Ray task, in order."""
        task = self.ray.remote(num_cpus=1, max_retries=0)(_gptq_task)
        at, how = _fail_hook("gptq")

        def submit(i: int, job: Any) -> Any:
            return task.remote(fn, job, how if i == at else "")

        def cancel(refs: list[Any]) -> None:
            for ref in refs:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # already finished, or its node is gone: nothing runs
                    pass

        return self._in_order(submit, jobs, self.workers, "GPTQ group", cancel)

    def _in_order(self, submit: Callable[[int, Any], Any], items: Iterable[Any], workers: int,
                  what: str, cleanup: Callable[[list[Any]], None]) -> Iterator[Any]:
        """Results of ``submit(i, item)`` in order, at most ``IN_FLIGHT_PER_WORKER`` per
        worker pending; Ray's errors become SerqError naming ``what`` and its index."""
        pending: list[tuple[int, Any, Any]] = []  # (index, name, ref)
        try:
            for i, item in enumerate(items):
                pending.append((i, getattr(item, "name", i), submit(i, item)))
                while len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    yield self._get(pending.pop(0), what)
            while pending:
                yield self._get(pending.pop(0), what)
        finally:  # done, failed or abandoned: nothing is left running
            cleanup([ref for _, _, ref in pending])

    def _get(self, entry: tuple[int, Any, Any], what: str) -> Any:
        i, name, ref = entry
        label = f"{what} {i}" + (f" ({name})" if name != i else "")
        ex = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except ex.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, SerqError):
                raise SerqError(str(cause)) from None
            if isinstance(cause, MemoryError):
                raise SerqError(_failed(label, "ran out of memory (MemoryError)",
                                        "give the workers more memory")) from None
            raise SerqError(_failed(label, f"failed: {_first_line(cause or err)}", "")) from None
        except ex.OutOfMemoryError as err:
            raise SerqError(_failed(label, "was killed by Ray's memory monitor (out of memory: "
                                    f"{_first_line(err)})", "give the workers more memory or "
                                    "use fewer per node")) from None
        except (ex.RayActorError, ex.WorkerCrashedError, ex.ObjectLostError) as err:
            raise SerqError(_failed(label, f"lost its Ray worker, which died "
                                    f"({_first_line(err)})", "")) from None
        except ex.RayError as err:
            raise SerqError(_failed(label, f"failed on Ray: {_first_line(err)}", "")) from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _failed(label: str, happened: str, hint: str) -> str:
    return (f"{FLAG}: {label} {happened}; nothing was written. The conversion is "
            "deterministic: a rerun gives the same model" + (f" ({hint})" if hint else ""))


@contextmanager
def cluster(address: str | None) -> Iterator[RayCluster | None]:
    """Ray for one conversion (None without ``address``): ``auto`` starts a local instance on
    127.0.0.1 with every CPU (never joining another one that happens to run here), shut down
    on exit; else the cluster at ``address``. Where this process has Ray initialized already,
    that is used as it is."""
    if address is None:
        yield None
        return
    check_address(address)
    if address == "auto":
        ray_cluster.keep_local_on_loopback()
    ray = ray_cluster.import_ray("convert --ray", "ray")
    started = not ray.is_initialized()
    ray_cluster.connect(ray, "local" if address == "auto" else address, None, flag=FLAG,
                        local_hint=LOCAL_HINT)
    c = RayCluster(ray, started)
    try:
        c.check_workers()
        yield c
    finally:
        c.close()
