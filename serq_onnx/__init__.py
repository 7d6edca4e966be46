"""serq-onnx: SERQ quantization of ONNX language models, run by onnxruntime."""

from .errors import SerqError
from .library import get_library_path, session, session_options

__version__ = "0.1.0"

__all__ = ["SerqError", "get_library_path", "session", "session_options", "convert", "__version__"]


def convert(*args, **kwargs):
    """Convert an ONNX model; see :func:`serq_onnx.convert.convert` (imported lazily)."""
    from .converter import convert as _convert

    return _convert(*args, **kwargs)
