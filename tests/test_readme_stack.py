"""The README's "Use it in your stack" blocks, run as written on a converted tiny Llama.

Each block is marked ``<!-- stack: NAME -->`` before its fence; it runs in a folder whose
``out/`` is a converted model, as the README's commands leave it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from serq_onnx.converter import convert

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- stack: (\w[\w-]*) -->\n```python\n(.*?)```", re.S)


def _blocks() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(README.read_text())}


def test_readme_has_the_stack_blocks():
    assert {"onnxruntime", "optimum", "genai"} <= set(_blocks())


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, tiny_llama.config["vocab_size"], 64, dtype=np.int64)
             for _ in range(2)]
    convert(tiny_llama.onnx_path, root / "out", calib_ids=calib, rank=16, progress=False,
            log=lambda *a: None)
    return root


def _run(name: str, root: Path, monkeypatch) -> dict:
    code = _blocks().get(name)
    assert code, f"README.md has no <!-- stack: {name} --> block"
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, f"README.md[{name}]", "exec"), scope)
    return scope


def test_plain_onnxruntime_block(converted, monkeypatch, tiny_llama):
    scope = _run("onnxruntime", converted, monkeypatch)
    logits = scope["logits"]
    assert logits.shape == (1, 4, tiny_llama.config["vocab_size"])
    assert np.isfinite(logits).all()


def test_optimum_block(converted, monkeypatch, capsys):
    pytest.importorskip("optimum.onnxruntime")
    scope = _run("optimum", converted, monkeypatch)
    text = capsys.readouterr().out
    # The block printed the decoded prompt followed by what generate() added to it.
    assert text.startswith("The quick brown fox") and len(text.strip()) > len("The quick brown fox")
    assert scope["inputs"]["input_ids"].shape[1] > 0


def test_genai_block(converted, monkeypatch, capsys):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed "
                        "(pip install '.[genai]'; make test installs it)")
    scope = _run("genai", converted, monkeypatch)
    text = capsys.readouterr().out
    assert text.startswith("The quick brown fox")
    assert len(scope["gen"].get_sequence(0)) == 32  # max_length, no end token in a random model
