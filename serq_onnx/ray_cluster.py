"""Connecting to Ray, shared by ``serve`` and ``convert --ray``: fast, clear failures.

Ray itself retries an unreachable address for about a minute and then raises its own
exception types; these helpers check the address with one TCP connection first and turn Ray's
errors into :class:`SerqError` naming the cluster and what to do (token authentication
included). A local instance started here keeps every address on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import SerqError

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps every address on 127.0.0.1


def import_ray(purpose: str, extra: str) -> Any:
    """``ray``, or a SerqError naming the extra to install for ``purpose``."""
    try:
        import ray
    except ImportError:
        raise SerqError(f"{purpose} needs Ray: pip install 'serq-onnx[{extra}]'") from None
    return ray


def keep_local_on_loopback() -> None:
    """Before Ray is imported: a local instance binds 127.0.0.1 only (workers inherit it)."""
    if "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def check_reachable(address: str, timeout: float = 5.0, flag: str = "--ray-address",
                    local_hint: str = "leave out --ray-address to start a local one") -> None:
    """A quick TCP check of ``host:port`` or ``ray://host:port`` before Ray tries (and retries)
    for a minute; ``auto`` and other forms are left to Ray."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if address in ("auto", "local"):
            return
        raise SerqError(f"{flag} {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise SerqError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}); "
                        f"start one with `ray start --head` there, check the address, or "
                        f"{local_hint}") from None


@contextmanager
def neutral_cwd() -> Iterator[None]:
    """Run ``ray.init`` from the temporary folder: Ray puts the driver's working directory first
    on every worker's ``sys.path``, and from a source checkout of serq-onnx that directory's
    ``serq_onnx/`` (which gains ``passes/`` and the op library only when installed) would
    shadow the installed package in the workers."""
    old = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        yield
    finally:
        os.chdir(old)


def connect(ray: Any, address: str | None, num_cpus: int | None,
            flag: str = "--ray-address", **hint: str) -> bool:
    """Connect to Ray at ``address``, or start a local instance (``"local"``; None: Ray's
    default, which may join one found on this machine); True when this call started one.
    Already connected: nothing is done (False). ``hint``: ``local_hint`` of
    :func:`check_reachable`."""
    if ray.is_initialized():
        return False
    local = address in (None, "local")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                              "configure_logging": True}
    if address:
        check_reachable(address, flag=flag, **hint)
        kwargs["address"] = address
    if local and num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        with neutral_cwd():
            ray.init(**kwargs)
    except Exception as err:  # ConnectionError, RuntimeError, ...: Ray's own messages
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = "a local Ray instance" if local else f"the Ray cluster at {address}"
        hint = ""
        if not local and os.environ.get("RAY_AUTH_MODE") is None:
            hint = ("; if the cluster uses token authentication (Ray's default for clusters "
                    "that ray.init starts), set RAY_AUTH_MODE=token, with the token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise SerqError(f"cannot connect to {where}: {first}{hint}") from None
    return local
