"""A converted model served by Ray Serve with an OpenAI-style completions endpoint.

Each replica is a :class:`CompletionServer`: it opens the model with the op library registered
(:class:`serq_onnx.generate.Generator`), so every replica can run SerqMatMul, and answers
``POST /v1/completions``, ``GET /v1/models`` and ``GET /health``. Replicas run on a local Ray
instance started here, or on an existing cluster (``ray_address``). Ray is the ``serve`` extra:
``pip install 'serq-onnx[serve]'``.

Failures come back as :class:`SerqError` in bounded time: a folder that cannot be served
(checked before Ray starts), an unreachable cluster (a TCP check before connecting), replicas
that fail to start or do not start within ``start_timeout`` (with the replica's own message).
A replica that dies while serving is replaced by Ray Serve; its requests in flight get HTTP
500, and ``serq-onnx serve`` prints a line for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import SerqError
from .ray_cluster import LOOPBACK_ENV, connect as _connect

APP_PREFIX = "serq-onnx-"  # Serve application names: this prefix and the model name
DEFAULT_PORT = 8000
CONSTRUCTOR_RETRIES = 1  # a model that fails to load fails the same way again: report it
REPLICA_HEADER = "x-serq-replica"


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SerqError("serving needs Ray Serve: pip install 'serq-onnx[serve]' (or "
                        "'ray[serve]')") from None
    return ray, serve


def _replica_id() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "local"))
    except Exception:  # outside a replica (a direct call in a test)
        return f"local-{os.getpid()}"


class CompletionServer:
    """One replica: a :class:`~serq_onnx.generate.Generator` behind HTTP routes.

    Requests run in worker threads, so the replica stays responsive (health checks, other
    requests) while one generates; Ray Serve's ``max_ongoing_requests`` bounds how many."""

    def __init__(self, model_dir: str, model_name: str, threads: int = 0):
        from .generate import Generator

        self.generator = Generator(model_dir, threads=threads)
        self.model_name = model_name
        self.created = int(time.time())
        self.replica = _replica_id()

    def _complete(self, request) -> dict[str, Any]:
        from . import completions

        done = [self.generator.complete(p, request.params) for p in request.prompts]
        return completions.response(self.model_name, done)

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request: the routes, without any HTTP framework."""
        from . import completions
        from .generate import RequestError

        path = path.rstrip("/") or "/"
        routes = {"/v1/completions": "POST", "/v1/models": "GET", "/health": "GET"}
        if path not in routes:
            return 404, completions.error(f"no route {path}; use POST /v1/completions, "
                                          "GET /v1/models or GET /health", code="not_found")
        if method != routes[path]:
            return 405, completions.error(f"{path} takes {routes[path]}, not {method}")
        if path == "/v1/models":
            return 200, completions.models(self.model_name, self.created)
        if path == "/health":
            return 200, {"status": "ok", "model": self.model_name, "replica": self.replica,
                         "pid": os.getpid(), "op_library": self.generator.op_library}
        try:
            request = completions.parse_request(body)
            if request.model is not None and request.model != self.model_name:
                return 404, completions.error(f"model {request.model!r} is not served here; "
                                              f"this server has {self.model_name!r}", param="model",
                                              code="model_not_found")
            return 200, await asyncio.to_thread(self._complete, request)
        except RequestError as err:
            return 400, completions.error(str(err), param=err.param)
        except SerqError as err:
            return 500, completions.error(str(err), kind="server_error")
        except Exception as err:  # a bug or an onnxruntime failure: one line, not a traceback
            first = str(err).splitlines()[0] if str(err) else ""
            return 500, completions.error(f"internal error: {type(err).__name__}: {first}",
                                          kind="server_error")

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):  # Serve mounts the application at its route prefix
            path = path[len(root):]
        status, body = await self.handle(request.method, path, await request.body())
        return JSONResponse(body, status_code=status, headers={REPLICA_HEADER: self.replica})


def _check_options(replicas: int, cpus_per_replica: float, max_ongoing_requests: int,
                   threads: int) -> None:
    if replicas < 1:
        raise SerqError(f"--replicas must be >= 1, got {replicas}")
    if cpus_per_replica < 0:
        raise SerqError(f"--cpus-per-replica must be >= 0, got {cpus_per_replica}")
    if max_ongoing_requests < 1:
        raise SerqError(f"--max-ongoing-requests must be >= 1, got {max_ongoing_requests}")
    if threads < 0:
        raise SerqError(f"--threads must be >= 0 (0: onnxruntime's default), got {threads}")


def build_app(model_dir: str | os.PathLike, *, replicas: int = 1, model_name: str | None = None,
              threads: int = 0, cpus_per_replica: float = 1.0, max_ongoing_requests: int = 4,
              library: str | None = None) -> Any:
    """The Ray Serve application (``serve.run`` it, or deploy it with a Serve config file).

    ``library``: the op library path the replicas use (default: ``$SERQ_ONNX_LIBRARY`` when
    set, else each replica's installed copy); it is passed to them as ``SERQ_ONNX_LIBRARY``."""
    _check_options(replicas, cpus_per_replica, max_ongoing_requests, threads)
    _, serve = _import_ray()
    from .generate import check_model_dir

    folder = check_model_dir(model_dir).resolve()
    if library is None:
        library = os.environ.get("SERQ_ONNX_LIBRARY") or None
    env = {"SERQ_ONNX_LIBRARY": str(library)} if library else {}
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if env:
        options["runtime_env"] = {"env_vars": env}
    deployment = serve.deployment(CompletionServer, name="CompletionServer",
                                  num_replicas=replicas, ray_actor_options=options,
                                  max_ongoing_requests=max_ongoing_requests,
                                  max_constructor_retry_count=CONSTRUCTOR_RETRIES)
    return deployment.bind(str(folder), model_name or folder.name, threads)


_BUILDER_ARGS = {"model_dir": str, "replicas": int, "model_name": str, "threads": int,
                 "cpus_per_replica": float, "max_ongoing_requests": int, "library": str}


def app_builder(args: dict[str, str]) -> Any:
    """Ray Serve's application builder, for deploying with Ray's own tools:
    ``serve run serq_onnx.serve:app_builder model_dir=out/ replicas=2`` (or a Serve config
    file with ``import_path: serq_onnx.serve:app_builder``). Keys: those of :func:`build_app`,
    with ``model_dir`` required."""
    unknown = sorted(set(args) - set(_BUILDER_ARGS))
    if unknown:
        raise SerqError(f"unknown argument(s) {', '.join(unknown)}; serq-onnx's application "
                        f"takes {', '.join(_BUILDER_ARGS)}")
    if "model_dir" not in args:
        raise SerqError("model_dir=<converted model folder> is required")
    try:
        kw = {k: _BUILDER_ARGS[k](v) for k, v in args.items()}
    except ValueError as err:
        raise SerqError(f"bad argument value: {err}") from None
    return build_app(kw.pop("model_dir"), **kw)


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as err:
        raise SerqError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose "
                        "another --port or --host") from None


def _replica_error(message: str) -> str:
    """The informative line of a failed deployment's message: the replica's own error."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "SerqError" in ln:
            return ln.split("SerqError:", 1)[-1].strip()
    for ln in reversed(lines):
        if "Error" in ln:
            return ln
    return lines[-1] if lines else "no message"


def _wait_running(serve: Any, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        last = app
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            messages = [app.message] + [d.message for d in app.deployments.values()]
            raise SerqError("the serving replicas failed to start: "
                            f"{_replica_error(chr(10).join(m for m in messages if m))}")
        time.sleep(0.25)
    state = f"{last.status}: {last.message}" if last is not None and last.message else (
        last.status if last is not None else "not created")
    raise SerqError(f"the serving replicas did not start within {timeout:.0f} s ({state}); "
                    "the cluster may lack free CPUs for them (see --replicas and "
                    "--cpus-per-replica)")


class Server:
    """A running application: its URL, and :meth:`stop` (also on ``with`` exit)."""

    def __init__(self, url: str, replicas: int, started_ray: bool, started_serve: bool,
                 app_name: str):
        self.url, self.replicas, self.app_name = url, replicas, app_name
        self.started_ray, self.started_serve = started_ray, started_serve
        self.ray_address = ""  # the cluster's GCS address, for `--ray-address` of other runs

    def stop(self) -> None:
        """Delete the application; shut Serve and Ray down where this process started them."""
        ray, serve = _import_ray()
        if not ray.is_initialized():
            return
        if self.started_serve:
            serve.shutdown()
        else:
            serve.delete(self.app_name)
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _running_serve() -> Any:
    """The HTTP options of a Serve instance already running on the cluster, or None."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # a Ray version without this helper: assume none runs
        return None
    return None if client is None else client.http_config


def start(model_dir: str | os.PathLike, *, replicas: int = 1, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, ray_address: str | None = None, num_cpus: int | None = None,
          cpus_per_replica: float = 1.0, threads: int = 0, model_name: str | None = None,
          max_ongoing_requests: int = 4, library: str | None = None,
          start_timeout: float = 120.0, route_prefix: str = "/") -> Server:
    """Serve ``model_dir`` at ``http://host:port{route_prefix}v1/completions`` and return once
    every replica is up. ``num_cpus``: CPUs of a local Ray instance (default: all); ignored
    with ``ray_address``. The Serve application is named ``serq-onnx-<model name>``; where one
    Serve instance runs several, each needs its own ``route_prefix``. A local instance keeps
    Ray on 127.0.0.1 (it serves this machine; nothing else joins it) unless Ray was imported
    before. See :func:`build_app` for the rest."""
    from .generate import check_model_dir

    _check_options(replicas, cpus_per_replica, max_ongoing_requests, threads)
    if not 0 < port < 65536:
        raise SerqError(f"--port must be in 1..65535, got {port}")
    folder = check_model_dir(model_dir)
    if not route_prefix.startswith("/"):
        raise SerqError(f"--route-prefix must start with /, got {route_prefix!r}")
    if ray_address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")  # read when ray is imported, workers inherit it
    ray, serve = _import_ray()
    app_name = APP_PREFIX + (model_name or default_model_name(folder))
    if ray_address is None and not ray.is_initialized():
        _check_port_free(host, port)  # a local instance: the proxy will listen on this machine
    started_ray = _connect(ray, ray_address, num_cpus)
    running = _running_serve()
    if running is not None and (running.host, running.port) != (host, port):
        if started_ray:
            ray.shutdown()
        raise SerqError(f"Ray Serve already runs on this cluster and listens on "
                        f"{running.host}:{running.port}; pass --host {running.host} --port "
                        f"{running.port} to add the model there, or stop it (`serve shutdown`)")
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    server = Server(url, replicas, started_ray, running is None, app_name)
    try:
        free = ray.cluster_resources().get("CPU", 0.0)
        if replicas * cpus_per_replica > free:
            raise SerqError(f"{replicas} replicas of {cpus_per_replica:g} CPUs need "
                            f"{replicas * cpus_per_replica:g} CPUs; the cluster has {free:g}. "
                            "Lower --replicas or --cpus-per-replica")
        app = build_app(model_dir, replicas=replicas, model_name=model_name, threads=threads,
                        cpus_per_replica=cpus_per_replica,
                        max_ongoing_requests=max_ongoing_requests, library=library)
        serve.start(http_options={"host": host, "port": port})
        serve.run_many([serve.RunTarget(target=app, name=app_name, route_prefix=route_prefix)],
                       wait_for_applications_running=False)
        _wait_running(serve, app_name, start_timeout)
        server.ray_address = str(getattr(ray.get_runtime_context(), "gcs_address", "") or "")
    except BaseException:
        server.stop()
        raise
    return server


def serve_forever(server: Server, poll_s: float = 0.5) -> None:
    """Block until interrupted, printing a line whenever replicas die or the application's
    status changes; a lost cluster is a SerqError."""
    _, serve = _import_ray()
    last_status, last_running = "RUNNING", server.replicas
    while True:
        time.sleep(poll_s)
        try:
            app = serve.status().applications.get(server.app_name)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SerqError(f"lost the Ray cluster ({first}); restart serq-onnx serve") from None
        if app is None:
            raise SerqError("the application was deleted from the Ray cluster; restart "
                            "serq-onnx serve")
        running = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
        if running < last_running:
            print(f"serq-onnx: {last_running - running} replica(s) died; Ray Serve is "
                  "starting new ones (requests in flight on them failed with HTTP 500)",
                  file=sys.stderr, flush=True)
        if app.status != last_status:
            print(f"serq-onnx: application {app.status}"
                  + (f": {_replica_error(app.message)}" if app.message else ""), file=sys.stderr,
                  flush=True)
        last_status, last_running = app.status, running


def default_model_name(model_dir: str | os.PathLike) -> str:
    return Path(model_dir).expanduser().resolve().name
