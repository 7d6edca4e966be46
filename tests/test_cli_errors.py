"""Bad inputs give one clear line on stderr, a non-zero exit and no output folder."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def _cli(*args: str) -> subprocess.CompletedProcess:
    # Run outside the source tree so the installed package (with its op library) is used.
    return subprocess.run([sys.executable, "-m", "serq_onnx.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=tempfile.gettempdir())


def _assert_clean_failure(proc: subprocess.CompletedProcess, words: tuple[str, ...], out) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serq-onnx: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_cli("convert", str(tmp_path / "nope.onnx"), "-o", str(out)),
                          ("not found", "nope.onnx"), out)


def test_corrupt_model(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    _assert_clean_failure(_cli("convert", str(bad), "-o", str(out)), ("not a readable ONNX",), out)


def test_model_without_linear_layers(tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input_ids"], ["logits"])], "g", [x], [y])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    out = tmp_path / "out"
    _assert_clean_failure(_cli("convert", str(path), "-o", str(out)), ("no linear layers",), out)


def test_existing_output_is_not_overwritten(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _cli("convert", str(tiny_llama.onnx_path), "-o", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,words", [
    (["--scheme", "w3a3"], ("invalid choice",)),
    (["--group-w", "33"], ("--group-w",)),
    (["--group-a", "48", "--group-w", "32"], ("--group-a",)),
    (["--calib", "/nonexistent/text.txt"], ("text file not found",)),
])
def test_bad_options(tiny_llama, tmp_path, flags, words):
    out = tmp_path / "out"
    proc = _cli("convert", str(tiny_llama.onnx_path), "-o", str(out), "-q", *flags)
    assert proc.returncode == 2, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_converts_and_reports(tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 40)
    out = tmp_path / "out"
    proc = _cli("convert", str(tiny_llama.onnx_path), "-o", str(out), "-q", "--rank", "32",
                "--group-w", "32", "--group-a", "32", "--calib", str(text),
                "--calib-samples", "4", "--calib-seqlen", "64")
    assert proc.returncode == 0, proc.stderr
    assert "converted 14 linear layers" in proc.stdout
    assert (out / "model.onnx").is_file()
