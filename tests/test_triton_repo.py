"""serq-onnx triton-repo: the layout Triton documents for ONNX models, a config.pbtxt that
parses as Triton's ModelConfig (the schema shipped in tritonclient) and describes the graph as
onnxruntime sees it, and a repository whose model runs with the library its config names.

Triton itself cannot run here; what the onnxruntime backend does with the repository
(register each op_library_filename, load <version>/model.onnx) is done with onnxruntime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import serq_onnx
from serq_onnx import SerqError
from serq_onnx.evaluate import decode_speed

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                          reason="the triton extra (tritonclient[grpc]) is not installed")
from google.protobuf import text_format  # noqa: E402

from serq_onnx.triton_repo import parse_config, write_repo  # noqa: E402

_ORT_TO_TRITON = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32",
                  "tensor(float16)": "TYPE_FP16", "tensor(int32)": "TYPE_INT32"}


@pytest.fixture(scope="module")
def converted(tiny_serq) -> Path:
    return tiny_serq


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _load(config_path: Path):
    return text_format.Parse(config_path.read_text(), pb2.ModelConfig())


def _run_like_triton(model_folder: Path, config) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for lib in config.model_operations.op_library_filename:
        so.register_custom_ops_library(lib)
    model = model_folder / "1" / "model.onnx"
    if model.is_dir():
        model = model / "model.onnx"
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def test_repository_layout_config_and_run(converted, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)  # a repository holds other models: left alone
    target = write_repo(converted, repo, model_name="tiny")
    assert target == (repo / "tiny").resolve()
    assert _files(repo / "tiny") == {"config.pbtxt", "1", "1/model.onnx", "libserq_onnx_ops.so"}
    assert _files(repo) == {"other"} | {f"tiny/{f}" for f in _files(repo / "tiny")} | {"tiny"}
    config = _load(target / "config.pbtxt")
    assert config.name == "tiny" and config.backend == "onnxruntime"
    assert config.max_batch_size == 0
    assert "max_batch_size: 0" in (target / "config.pbtxt").read_text()
    lib = config.model_operations.op_library_filename
    assert list(lib) == [str(target / "libserq_onnx_ops.so")] and Path(lib[0]).is_absolute()
    assert Path(lib[0]).read_bytes() == Path(serq_onnx.get_library_path()).read_bytes()
    assert [g.kind for g in config.instance_group] == [pb2.ModelInstanceGroup.KIND_CPU]

    # Inputs and outputs as onnxruntime reports them: names, types, -1 for symbolic dims.
    sess = serq_onnx.session(converted / "model.onnx")
    for declared, actual in ((config.input, sess.get_inputs()), (config.output,
                                                                  sess.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert pb2.DataType.Name(t.data_type) == _ORT_TO_TRITON[a.type]
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in a.shape]
    assert any(t.name.startswith("past_key_values.") for t in config.input)

    # What the backend does: the library named in the config, the version's model.onnx.
    prompt = np.array([3, 17, 41, 5, 99], dtype=np.int64)
    ours = decode_speed(_run_like_triton(target, config), prompt, 8, warmup=False)["tokens"]
    assert ours == decode_speed(sess, prompt, 8, warmup=False)["tokens"]


def test_external_data_goes_in_a_model_folder(converted, tmp_path):
    src = tmp_path / "ext"
    src.mkdir()
    for f in converted.iterdir():
        if f.name != "model.onnx":
            (src / f.name).write_bytes(f.read_bytes())
    onnx.save(onnx.load(str(converted / "model.onnx")), str(src / "model.onnx"),
              save_as_external_data=True, location="model.onnx.data")
    target = write_repo(src, tmp_path / "repo", library_path="/models/ext/libserq_onnx_ops.so")
    assert _files(target) == {"config.pbtxt", "libserq_onnx_ops.so", "1", "1/model.onnx",
                              "1/model.onnx/model.onnx", "1/model.onnx/model.onnx.data"}
    config = _load(target / "config.pbtxt")
    assert config.name == "ext"
    assert list(config.model_operations.op_library_filename) == [
        "/models/ext/libserq_onnx_ops.so"]  # the path as the server sees it, verbatim
    config.model_operations.op_library_filename[:] = [str(target / "libserq_onnx_ops.so")]
    prompt = np.array([7, 8, 9], dtype=np.int64)
    ref = decode_speed(serq_onnx.session(converted / "model.onnx"), prompt, 6,
                       warmup=False)["tokens"]
    assert decode_speed(_run_like_triton(target, config), prompt, 6, warmup=False)["tokens"] == ref


def test_errors_and_overwrite(converted, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(SerqError, match="no model.onnx"):
        write_repo(tmp_path, repo)
    with pytest.raises(SerqError, match="valid Triton model folder name"):
        write_repo(converted, repo, model_name="a b")
    with pytest.raises(SerqError, match="overlaps the model folder"):
        write_repo(converted, converted.parent, model_name=converted.name)
    target = write_repo(converted, repo, model_name="m")
    with pytest.raises(SerqError, match="--overwrite"):
        write_repo(converted, repo, model_name="m")
    write_repo(converted, repo, model_name="m", kind="gpu", instances=2, overwrite=True)
    group = _load(target / "config.pbtxt").instance_group[0]
    assert group.kind == pb2.ModelInstanceGroup.KIND_GPU and group.count == 2
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left over
    (repo / "mine").mkdir()
    (repo / "mine" / "keep.txt").write_text("x")
    with pytest.raises(SerqError, match="not a Triton model folder"):
        write_repo(converted, repo, model_name="mine", overwrite=True)
    assert (repo / "mine" / "keep.txt").read_text() == "x"


def test_fp16_and_fixed_dims(tmp_path):
    """Types and dims come from the graph: float16 as TYPE_FP16, fixed dims kept, names
    (symbolic) as -1."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    h = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16,
                                      ["batch", 2, "past", 8])
    y = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT16,
                                      ["batch", 2, "past", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"],
                                                ["present.0.key"])], "g", [x, h], [y])
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    config = _load(write_repo(folder, tmp_path / "repo") / "config.pbtxt")
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("input_ids", "TYPE_INT64", [-1, -1]),
        ("past_key_values.0.key", "TYPE_FP16", [-1, 2, -1, 8])]
    assert pb2.DataType.Name(config.output[0].data_type) == "TYPE_FP16"


def test_without_tritonclient_a_clear_error(converted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(SerqError, match=r"pip install 'serq-onnx\[triton\]'"):
        write_repo(converted, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("text,words", [
    ('name: "m" backend: "onnxruntime" input { name: "x" data_type: TYPE_NOPE dims: [1] }',
     "does not parse"),
    ('name: "m" backend: "onnxruntime" max_batch_size: 0', "lacks"),
    ('name: "m" backend: "onnxruntime" input { name: "x" dims: [1] } output { name: "y" '
     'data_type: TYPE_FP32 dims: [1] }', "no data type"),
])
def test_parse_config_rejects(text, words):
    with pytest.raises(SerqError, match=words):
        parse_config(text)


def test_cli(converted, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serq_onnx.cli", "triton-repo", str(converted),
                           str(tmp_path / "repo")], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    assert "tiny-serq" in proc.stdout and (tmp_path / "repo" / "tiny-serq" / "config.pbtxt"
                                          ).is_file()
    proc = subprocess.run([sys.executable, "-m", "serq_onnx.cli", "triton-repo", str(tmp_path),
                           str(tmp_path / "repo2")], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 2 and "no model.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "repo2").exists()


def test_cli_json(converted, tmp_path, capsys):
    from serq_onnx.cli import main

    assert main(["triton-repo", str(converted), str(tmp_path / "repo"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_folder"] == str(tmp_path / "repo" / "tiny-serq")
    assert Path(data["config"]).is_file()
