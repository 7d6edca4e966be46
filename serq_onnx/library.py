"""Locating the op library and opening onnxruntime sessions with it registered."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import SerqError

LIBRARY_NAME = "libserq_onnx_ops.so"
ENV_OVERRIDE = "SERQ_ONNX_LIBRARY"


def get_library_path() -> str:
    """Path of the SerqMatMul op library to pass to ``SessionOptions.register_custom_ops_library``.

    ``$SERQ_ONNX_LIBRARY`` overrides the copy installed inside the package.
    """
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        if not Path(override).is_file():
            raise SerqError(f"{ENV_OVERRIDE}={override} does not name a file")
        return str(Path(override).resolve())
    path = Path(__file__).resolve().parent / "lib" / LIBRARY_NAME
    if not path.is_file():
        raise SerqError(
            f"the op library is missing ({path}); reinstall serq-onnx with `pip install .` "
            "so that it is built, or point SERQ_ONNX_LIBRARY at a built copy"
        )
    return str(path)


def session_options(options: Any = None) -> Any:
    """``options`` (or new SessionOptions) with the op library registered."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so


def session(model: str | os.PathLike | bytes, providers: list | None = None,
            sess_options: Any = None, **kwargs: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``model`` (a path or serialized bytes) with the
    SerqMatMul library registered."""
    import onnxruntime as ort

    so = session_options(sess_options)
    source = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(source, sess_options=so,
                                providers=providers or ["CPUExecutionProvider"], **kwargs)
