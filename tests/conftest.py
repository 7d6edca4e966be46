"""Shared fixtures: tiny random Llama models exported by Optimum, built once per test session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class TinyModel:
    """A tiny model's Hugging Face folder and its Optimum ONNX export (``model.onnx``)."""

    hf_dir: Path
    onnx_path: Path

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.hf_dir / "config.json").read_text())


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, dtype: str = "fp32",
           arch: str = "llama", **overrides: Any) -> TinyModel:
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from serq_onnx.export import export_causal_lm, make_tiny_model

    root = tmp_path_factory.mktemp(name)
    hf_dir = make_tiny_model(root / "hf", arch, seed=0, **overrides)
    return TinyModel(hf_dir=hf_dir, onnx_path=export_causal_lm(hf_dir, root / "onnx", dtype=dtype))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Hidden 64, intermediate 160, 4 heads, 2 kv heads (GQA), 2 layers."""
    return _build(tmp_path_factory, "tiny_llama")


@pytest.fixture
def tiny_llama_external(tiny_llama: TinyModel, tmp_path: Path) -> Path:
    """``tiny_llama``'s folder copied with every weight in external data
    (``model.onnx_data``), as exports over 2 GB come; returns its ``model.onnx``."""
    import shutil

    import onnx

    folder = tmp_path / "ext"
    shutil.copytree(tiny_llama.onnx_path.parent, folder)
    proto = onnx.load(str(tiny_llama.onnx_path))
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def tiny_llama_odd(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Sizes that are multiples of no quantization group: hidden 96 (head_dim 24), inter 200."""
    return _build(tmp_path_factory, "tiny_llama_odd", hidden_size=96, intermediate_size=200,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_fp16(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """``tiny_llama``'s weights, exported by Optimum with ``--dtype fp16`` (the usual GPU export)."""
    return _build(tmp_path_factory, "tiny_llama_fp16", dtype="fp16")


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """``tiny_arch(name)``: the tiny model of ``serq_onnx.export.TINY_ARCHS[name]`` (same sizes
    as ``tiny_llama``; "llama" is ``tiny_llama``), each exported once per session."""
    built: dict[str, TinyModel] = {}

    def get(arch: str) -> TinyModel:
        if arch not in built:
            built[arch] = (request.getfixturevalue("tiny_llama") if arch == "llama"
                           else _build(tmp_path_factory, f"tiny_{arch}", arch=arch))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_serq(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` converted at the defaults with fast settings (two 64-token calibration
    sequences, rank 16) into a folder named ``tiny-serq``; tests only read it."""
    import numpy as np

    from serq_onnx.converter import convert

    rng = np.random.default_rng(0)
    vocab = tiny_llama.config["vocab_size"]
    out = tmp_path_factory.mktemp("tiny_serq") / "tiny-serq"
    convert(tiny_llama.onnx_path, out, calib_ids=[rng.integers(0, vocab, 64) for _ in range(2)],
            rank=16, progress=False)
    return out
