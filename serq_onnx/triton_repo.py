"""A Triton Inference Server model repository for a converted model (onnxruntime backend).

Layout, as Triton documents it for ONNX models::

    REPO/<name>/config.pbtxt
    REPO/<name>/libserq_onnx_ops.so        the op library, copied
    REPO/<name>/1/model.onnx               a single-file model, or, with external data:
    REPO/<name>/1/model.onnx/model.onnx    ... a folder named model.onnx holding the model
    REPO/<name>/1/model.onnx/<data files>      and its data files

The onnxruntime backend hands each ``model_operations.op_library_filename`` to onnxruntime's
``RegisterCustomOpsLibrary`` as it is, so the library is found by ``dlopen`` from the server's
working directory, not from the model folder: the path written is absolute, that of the copy
(``library_path`` overrides it with the path the server sees, e.g. inside a container).
``max_batch_size`` is 0 because the export has its own batch dimension, and every input and
output (the KV cache included) is listed with the graph's dtypes and dims (-1 where symbolic):
the client runs the decode loop, feeding ``present.*`` back as ``past_key_values.*``. Triton's
sequence batching (keeping the cache in the server) is not configured.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import output_dir
from .errors import SerqError

# onnx TensorProto data types -> Triton's model-config DataType names.
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16",
                 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64",
                 16: "TYPE_BF16"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
VERSION = "1"


def _model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SerqError("writing a Triton repository needs Triton's model-config schema from "
                        "tritonclient: pip install 'serq-onnx[triton]' (or "
                        "'tritonclient[grpc]')") from None
    return model_config_pb2


def _tensors(values: Any, pb2: Any, kind: str, model: Path) -> list[Any]:
    out = []
    for v in values:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or t.elem_type not in _TRITON_TYPES:
            raise SerqError(f"{model}: {kind} {v.name!r} has a type Triton's onnxruntime "
                            "backend cannot carry; convert an Optimum causal-LM export")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not t.HasField("shape"):
            raise SerqError(f"{model}: {kind} {v.name!r} has no shape; Triton needs its rank")
        cls = pb2.ModelInput if kind == "input" else pb2.ModelOutput
        out.append(cls(name=v.name, data_type=pb2.DataType.Value(_TRITON_TYPES[t.elem_type]),
                       dims=dims))
    return out


def model_config(model_path: Path, name: str, library: str, kind: str = "cpu",
                 instances: int = 1) -> Any:
    """The ``ModelConfig`` message for a converted model's graph (read without weights)."""
    import onnx

    pb2 = _model_config_pb2()
    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as err:  # protobuf raises several types for a corrupt file
        raise SerqError(f"{model_path} is not a readable ONNX model "
                        f"({type(err).__name__})") from None
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    group = pb2.ModelInstanceGroup(
        count=instances, kind=pb2.ModelInstanceGroup.Kind.Value(
            "KIND_GPU" if kind == "gpu" else "KIND_CPU"))
    return pb2.ModelConfig(
        name=name, backend="onnxruntime", max_batch_size=0,
        input=_tensors(inputs, pb2, "input", model_path),
        output=_tensors(graph.output, pb2, "output", model_path),
        instance_group=[group],
        model_operations=pb2.ModelOperations(op_library_filename=[library]))


def config_text(config: Any) -> str:
    """``config.pbtxt`` text: a comment on how it was made, ``max_batch_size: 0`` spelled out
    (proto3 omits zeros), then the message in Triton's usual style (``dims: [-1, 2]``)."""
    from google.protobuf import text_format

    from . import __version__

    body = text_format.MessageToString(config, use_short_repeated_primitives=True)
    first, rest = body.split("\n", 1)
    return (f"# Written by serq-onnx {__version__} (serq-onnx triton-repo) for Triton's "
            "onnxruntime backend.\n# The model has its own batch dimension, hence "
            "max_batch_size 0; the client feeds present.* back as past_key_values.*.\n"
            f"{first}\nmax_batch_size: 0\n{rest}")


def parse_config(text: str) -> Any:
    """``config.pbtxt`` text parsed into Triton's ``ModelConfig``; SerqError if it does not
    parse or lacks what the onnxruntime backend needs."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    try:
        config = text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as err:
        raise SerqError(f"config.pbtxt does not parse as Triton's ModelConfig: {err}") from None
    if config.backend != "onnxruntime" or not config.name or not config.input \
            or not config.output:
        raise SerqError("config.pbtxt lacks the name, onnxruntime backend, inputs or outputs")
    for t in list(config.input) + list(config.output):
        if t.data_type == pb2.DataType.Value("TYPE_INVALID") or not t.dims:
            raise SerqError(f"config.pbtxt: {t.name} has no data type or dims")
    return config


def _model_files(model_dir: Path) -> tuple[Path, list[Path]]:
    """model.onnx and the external data files it names."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = model_dir / "model.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    data = set()
    for t in proto.graph.initializer:
        if uses_external_data(t):
            location = ExternalDataInfo(t).location
            path = (model_dir / location).resolve()
            if model_dir.resolve() not in path.parents:
                raise SerqError(f"{model}: external data {location!r} lies outside the model's "
                                "folder; keep the data files beside model.onnx")
            if not path.is_file():
                raise SerqError(f"{model}: its external data file {location} is missing")
            data.add(path)
    return model, sorted(data)


def write_repo(model_dir: str | os.PathLike, repo: str | os.PathLike, *,
               model_name: str | None = None, library_path: str | None = None,
               kind: str = "cpu", instances: int = 1, overwrite: bool = False) -> Path:
    """Write ``repo/<model_name>`` for ``model_dir`` (a converted model folder); returns it.

    Written in a hidden folder beside it and renamed into place: never half a model folder.
    Other models in ``repo`` are left alone."""
    from .library import LIBRARY_NAME, get_library_path

    _model_config_pb2()  # the extra is missing: say so before anything is written
    src = Path(model_dir).expanduser()
    if not (src / "model.onnx").is_file():
        raise SerqError(f"no model.onnx in {model_dir}; pass the output folder of "
                        "`serq-onnx convert`")
    name = model_name or src.resolve().name
    if not _NAME.match(name):
        raise SerqError(f"model name {name!r} is not a valid Triton model folder name (letters, "
                        "digits, _ . -); pass --model-name")
    if kind not in ("cpu", "gpu"):
        raise SerqError(f"--kind must be cpu or gpu, got {kind!r}")
    if instances < 1:
        raise SerqError(f"--instances must be >= 1, got {instances}")
    root = Path(repo).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise SerqError(f"the repository {repo} exists and is not a folder")
    target = root / name
    src_r = src.resolve()
    if target == src_r or src_r in target.parents or target in src_r.parents:
        raise SerqError(f"the repository folder {target} overlaps the model folder {model_dir}; "
                        "choose a repository outside it")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise SerqError(f"{target} exists; pass --overwrite to replace it, or choose "
                            "another --model-name")
        if not (target / "config.pbtxt").is_file():
            raise SerqError(f"{target} has no config.pbtxt, so it is not a Triton model folder; "
                            "--overwrite will not replace it")
    model, data = _model_files(src)
    library = get_library_path()
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise SerqError(f"cannot write in {root}; choose a repository you can write")

    from google.protobuf import text_format

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)
        version = tmp / VERSION
        if data:  # Triton's layout for a model of several files: a folder named model.onnx
            (version / "model.onnx").mkdir(parents=True)
            shutil.copy2(model, version / "model.onnx" / "model.onnx")
            for f in data:
                dest = version / "model.onnx" / f.relative_to(src_r)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
        else:
            version.mkdir()
            shutil.copy2(model, version / "model.onnx")
        shutil.copy2(library, tmp / LIBRARY_NAME)
        lib_ref = library_path or str(target / LIBRARY_NAME)
        config = model_config(model, name, lib_ref, kind=kind, instances=instances)
        text = config_text(config)
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        if parse_config((tmp / "config.pbtxt").read_text(encoding="utf-8")) != config:
            raise SerqError("config.pbtxt did not read back as written; please report it")
        output_dir.commit(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
