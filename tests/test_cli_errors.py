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
    assert "converted 15 linear layers" in proc.stdout  # 14 decoder linears and the LM head
    assert "attention: GroupQueryAttention in 2 layers" in proc.stdout
    assert (out / "model.onnx").is_file()
    off = _cli("convert", str(tiny_llama.onnx_path), "-o", str(tmp_path / "off"), "-q",
               "--no-fuse-attention", "--lm-head", "float", "--rank", "32", "--group-w", "32",
               "--group-a", "32", "--calib", str(text), "--calib-samples", "2",
               "--calib-seqlen", "32")
    assert off.returncode == 0, off.stderr
    assert "converted 14 linear layers" in off.stdout
    assert "attention: as exported (--no-fuse-attention)" in off.stdout


def _one_error_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serq-onnx: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("flags,words", [
    (["--calib-seqlen", "0"], ("--calib-seqlen", ">= 1")),
    (["--calib-seqlen", "-5"], ("--calib-seqlen",)),
    (["--calib-samples", "0"], ("--calib-samples",)),
    (["--rank", "-1"], ("--rank",)),
    (["--rank", "100000"], ("--rank 100000 exceeds",)),
])
def test_convert_argument_errors(tiny_llama, tmp_path, flags, words):
    out = tmp_path / "out"
    proc = _cli("convert", str(tiny_llama.onnx_path), "-o", str(out), "-q", *flags)
    _one_error_line(proc, *words)
    assert not out.exists()


def _garbage_model(tmp_path, kind):
    path = tmp_path / "model.onnx"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path


@pytest.mark.parametrize("flags,words", [
    (["--rank", "-1"], ("--rank",)),
    (["--group", "0"], ("--group", "power of two")),
    (["--group", "7"], ("--group",)),
    (["--group-a", "3"], ("--group-a",)),
    (["--group-a", "-2"], ("--group-a",)),
    (["--threads", "-1"], ("--threads",)),
    (["--m", "0"], ("--m",)),
    (["--m", "x"], ("--m",)),
    (["--seconds", "0"], ("--seconds",)),
    (["--shape", "1x5"], ("--shape",)),
])
def test_bench_argument_errors(flags, words):
    _one_error_line(_cli("bench", "-q", "--shape", "64x32", "--m", "1", *flags), *words)


def test_bench_model_errors(tiny_llama, tmp_path):
    _one_error_line(_cli("bench", "-q", "--model", str(tmp_path / "none.onnx")), "not found")
    _one_error_line(_cli("bench", "-q", "--model", str(_garbage_model(tmp_path, "garbage"))),
                    "not a readable ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_llama.onnx_path.read_bytes()[:5000])
    _one_error_line(_cli("bench", "-q", "--model", str(truncated)), "not a readable ONNX model")


@pytest.fixture
def eval_text(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 20)
    return text


def test_eval_corrupt_model(tiny_llama, tmp_path, eval_text):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tiny_llama.onnx_path.parent / "tokenizer.json")
                                            .read_bytes())
    (folder / "model.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    _one_error_line(_cli("eval", str(folder), "--text", str(eval_text), "-q"),
                    "not a readable ONNX model")


def test_eval_json_naming_a_folder_fails_before_the_run(tiny_llama, tmp_path, eval_text):
    proc = _cli("eval", str(tiny_llama.onnx_path.parent), "--text", str(eval_text), "-q",
                "--json", str(tmp_path))
    _one_error_line(proc, "--json", "is a folder")
    assert "perplexity" not in proc.stdout


def test_eval_without_tokenizer_names_evaluation(tiny_llama, tmp_path, eval_text):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(tiny_llama.onnx_path.read_bytes())
    _one_error_line(_cli("eval", str(folder), "--text", str(eval_text), "-q"),
                    "no tokenizer.json", "evaluation text")


@pytest.mark.parametrize("flags,words", [(["--ctx", "1"], ("--ctx",)),
                                         (["--max-tokens", "0"], ("--max-tokens",))])
def test_eval_argument_errors(tiny_llama, eval_text, flags, words):
    _one_error_line(_cli("eval", str(tiny_llama.onnx_path.parent), "--text", str(eval_text),
                         "-q", *flags), *words)


def test_every_option_names_its_default_and_version_prints():
    """Help text names each option's default (flags excepted), as users expect of a CLI."""
    import argparse

    from serq_onnx import __version__, cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in sub.choices.items():
        for a in sp._actions:
            flag = isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction,
                                  argparse._StoreFalseAction))
            if a.option_strings and not flag and not a.required and "default" not in (a.help or ""):
                missing.append((name, a.option_strings[0]))
    assert not missing
    assert set(sub.choices) == {"convert", "inspect", "eval", "nbits", "bench", "genai-config",
                                "serve", "triton-repo"}
    assert all(c in parser.description for c in ("SerqMatMul", "onnxruntime"))
    assert "``" not in parser.format_help()
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"serq-onnx {__version__}"
