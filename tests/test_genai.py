"""onnxruntime-genai: converted folders generate in genai as in a plain session, and graphs of
genai's own model builder convert and run there too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serq_onnx import genai
from serq_onnx.errors import SerqError

PROMPT = np.array([5, 17, 42, 99, 7, 3, 250, 11], np.int64)
NEW_TOKENS = 16
# The converted tiny Llama's logits against its float model, relative RMS on 32 random tokens:
# measured 0.05-0.14 over five seeds (calibration on 32 random tokens is poor), the same for the
# Optimum and the builder graph, 0.16 for the tied-embedding variant; 0.25 fails on a broken
# fold or a mislabelled packed qkv weight, which give O(1).
FLOAT_REL_RMS = 0.25
# The builder graph's conversion against the Optimum export's, same weights and calibration:
# measured max |diff| 2.4e-7 (float32 rounding of two attention implementations).
SAME_CONVERSION_ABS = 1e-5


@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai",
                               reason="onnxruntime-genai is not installed (pip install "
                               "'serq-onnx[genai]'; make test installs it)")


def _convert(model: Path, out: Path):
    from serq_onnx.converter import convert

    rng = np.random.default_rng(0)
    return convert(model, out, rank=8, calib_ids=[rng.integers(3, 320, 16) for _ in range(2)],
                   progress=False, log=lambda *a: None)


def _plain_greedy(model: Path) -> list[int]:
    """Greedy tokens of a plain onnxruntime session (the harness's numpy loop)."""
    from serq_onnx.evaluate import decode_speed

    return decode_speed(model, PROMPT, new_tokens=NEW_TOKENS, warmup=False,
                        io_binding=False)["tokens"]


def _assert_same_greedy(got: list[int], want: list[int], eos: int, varied: bool = True) -> None:
    """genai stops at EOS; the plain loop does not. Same tokens up to where genai stopped."""
    assert got == want[:len(got)], (got, want)
    assert len(got) == len(want) or got[-1] == eos
    if varied:
        assert len(set(want)) > 2, "degenerate generation: the comparison would prove little"


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genai") / "w4a8"
    _convert(tiny_llama.onnx_path, out)
    return out


def _build(hf_dir: Path, root: Path) -> Path:
    """genai's model builder on a Hugging Face folder (float32, CPU); its model.onnx."""
    out = root / "fp32"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "model.onnx"


@pytest.fixture(scope="module")
def builder_model(og, tiny_llama, tmp_path_factory) -> Path:
    return _build(tiny_llama.hf_dir, tmp_path_factory.mktemp("builder"))


def test_convert_writes_genai_config_with_the_library_inside(converted, tiny_llama):
    cfg = json.loads((converted / genai.GENAI_CONFIG).read_text())
    dec = cfg["model"]["decoder"]
    lib = dec["session_options"]["custom_ops_library"]
    # genai (0.18) refuses ".." and paths outside the model folder: a bare name, copied in.
    assert lib == Path(lib).name and (converted / lib).is_file()
    hf = tiny_llama.config
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids",
                             "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (
        hf["num_hidden_layers"], hf["num_key_value_heads"],
        hf["hidden_size"] // hf["num_attention_heads"])
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["eos_token_id"] == hf["eos_token_id"]


@pytest.mark.parametrize("share_buffer", [True, False])
def test_genai_greedy_equals_plain_session(og, converted, tiny_llama, tmp_path, monkeypatch,
                                           capsys, share_buffer):
    """The config written by `serq-onnx genai-config` on a folder without one; generation from
    another working directory (the library is found in the model folder, not the cwd)."""
    from serq_onnx import cli

    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    (folder / genai.GENAI_CONFIG).unlink()
    (folder / "libserq_onnx_ops.so").unlink()
    args = ["genai-config", str(folder), "--json"] + ([] if share_buffer else
                                                      ["--no-share-buffer"])
    assert cli.main(args) == 0
    written = json.loads(capsys.readouterr().out)  # --json: one object on stdout
    assert written["genai_config"] == str(folder / genai.GENAI_CONFIG)
    decoder = written["config"]["model"]["decoder"]
    assert decoder["session_options"]["custom_ops_library"] == "libserq_onnx_ops.so"
    assert bool(written["config"]["search"]["past_present_share_buffer"]) == share_buffer
    monkeypatch.chdir(tmp_path)
    got = genai.generate(folder, PROMPT, NEW_TOKENS)["tokens"]
    _assert_same_greedy(got, _plain_greedy(folder / "model.onnx"),
                        tiny_llama.config["eos_token_id"])


def test_builder_graph_converts_and_runs_in_genai(og, builder_model, converted, tiny_llama,
                                                  tmp_path):
    from serq_onnx import compare, library

    out = tmp_path / "w4a8"
    report = _convert(builder_model, out)
    assert "already fused by the exporter: 2 GroupQueryAttention" in report.attention
    # packed q/k/v labelled as such; every linear layer of the builder graph converted
    assert report.layers_by_role == {"qkv": 2, "o": 2, "gate": 2, "up": 2, "down": 2,
                                     "lm_head": 1}
    assert report.folds.get("scale->gamma") == 5  # SkipSimplifiedLayerNormalization gammas
    cfg = json.loads((out / genai.GENAI_CONFIG).read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == \
        "libserq_onnx_ops.so"
    assert "position_ids" not in cfg["model"]["decoder"]["inputs"]  # the builder has none

    got = genai.generate(out, PROMPT, NEW_TOKENS)["tokens"]
    _assert_same_greedy(got, _plain_greedy(out / "model.onnx"), tiny_llama.config["eos_token_id"])

    ids = np.random.default_rng(1).integers(3, 320, 32)
    ref = compare.logits(compare.cpu_session(builder_model), ids)
    conv = compare.logits(library.session(out / "model.onnx"), ids)
    assert _rel_rms(conv, ref) < FLOAT_REL_RMS
    # the builder's float graph computes the Optimum export's function (float32 rounding)...
    opt = compare.logits(compare.cpu_session(tiny_llama.onnx_path), ids)
    assert np.abs(ref - opt).max() < SAME_CONVERSION_ABS
    # ...and its conversion the Optimum export's conversion (tested against the references)
    opt_conv = compare.logits(library.session(converted / "model.onnx"), ids)
    assert np.abs(conv - opt_conv).max() < SAME_CONVERSION_ABS


def test_builder_graph_with_tied_embeddings(og, tmp_path):
    """The builder ties the other way round from Optimum (the head reads the initializer, the
    embedding its Transpose): the head still converts, and the embedding keeps the float table."""
    pytest.importorskip("torch")
    import onnx_ir as ir

    from serq_onnx import compare, library
    from serq_onnx.export import make_tiny_llama

    hf = make_tiny_llama(tmp_path / "hf", seed=1, tie_word_embeddings=True)
    model = _build(hf, tmp_path / "builder")
    out = tmp_path / "w4a8"
    report = _convert(model, out)
    assert report.layers_by_role.get("lm_head") == 1
    g = ir.load(out / "model.onnx").graph
    embed = next(n for n in g if n.op_type == "Gather" and n.inputs[1].name == "input_ids")
    table = embed.inputs[0].producer().inputs[0]  # Transpose of the float [K, V] initializer
    assert table.const_value is not None and table.const_value.dtype == ir.DataType.FLOAT
    ids = np.random.default_rng(1).integers(3, 320, 32)
    rel = _rel_rms(compare.logits(library.session(out / "model.onnx"), ids),
                   compare.logits(compare.cpu_session(model), ids))
    assert rel < FLOAT_REL_RMS, rel
    # A tied random model mostly repeats its last token: equal, if not varied, tokens.
    eos = json.loads((hf / "config.json").read_text())["eos_token_id"]
    _assert_same_greedy(genai.generate(out, PROMPT, NEW_TOKENS)["tokens"],
                        _plain_greedy(out / "model.onnx"), eos, varied=False)


def test_attention_as_exported_gets_no_shared_buffer(og, tiny_llama, tmp_path):
    """Optimum's spelled-out attention concatenates past and new keys: genai must hand it a
    growing cache, not one preallocated buffer."""
    from serq_onnx.converter import convert

    out = tmp_path / "unfused"
    rng = np.random.default_rng(0)
    convert(tiny_llama.onnx_path, out, rank=8, fuse_attention=False, verify=False,
            calib_ids=[rng.integers(3, 320, 16) for _ in range(2)], progress=False,
            log=lambda *a: None)
    cfg = json.loads((out / genai.GENAI_CONFIG).read_text())
    assert cfg["search"]["past_present_share_buffer"] is False
    _assert_same_greedy(genai.generate(out, PROMPT, NEW_TOKENS)["tokens"],
                        _plain_greedy(out / "model.onnx"), tiny_llama.config["eos_token_id"])


def test_generation_config_values(converted, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(converted, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": None, "early_stopping": "never"}))
    search = genai.genai_config(folder)["search"]
    assert (search["do_sample"], search["temperature"], search["top_k"],
            search["early_stopping"]) == (True, 0.7, 50, False)
    (folder / "generation_config.json").write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(SerqError, match="top_p is 'high', not a float"):
        genai.genai_config(folder)


def test_failed_conversion_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(genai, "write_genai_config", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        _convert(tiny_llama.onnx_path, out)
    assert list(tmp_path.iterdir()) == []


def test_no_config_json_means_no_genai_config(tiny_llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny_llama.onnx_path, src / "model.onnx")
    out = tmp_path / "out"
    _convert(src / "model.onnx", out)
    assert not (out / genai.GENAI_CONFIG).exists() and not (out / "libserq_onnx_ops.so").exists()
    with pytest.raises(SerqError, match="no config.json"):
        genai.write_genai_config(out)


def test_bad_folders_are_refused_clearly(converted, tmp_path):
    with pytest.raises(SerqError, match="is not a folder"):
        genai.write_genai_config(tmp_path / "missing")
    folder = tmp_path / "m"
    shutil.copytree(converted, folder)
    with pytest.raises(SerqError, match="has no other.onnx"):
        genai.write_genai_config(folder, model_file="other.onnx")
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(SerqError, match="generation_config.json is not valid JSON"):
        genai.write_genai_config(folder)
    (folder / "generation_config.json").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": None}))
    with pytest.raises(SerqError, match="lacks a usable"):
        genai.write_genai_config(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SerqError, match="the op library .* is not a file"):
        genai.write_genai_config(folder, library=tmp_path / "nolib.so")


def test_library_given_by_a_relative_path_is_named_by_its_file_name(converted, tmp_path,
                                                                     monkeypatch):
    from serq_onnx.library import get_library_path

    folder = tmp_path / "a" / "m"
    shutil.copytree(converted, folder)
    (folder / "libserq_onnx_ops.so").unlink()
    elsewhere = tmp_path / "lib"
    elsewhere.mkdir()
    shutil.copy(get_library_path(), elsewhere / "libcopy.so")
    monkeypatch.chdir(folder)
    genai.write_genai_config(folder, library=Path("..") / ".." / "lib" / "libcopy.so")
    cfg = json.loads((folder / genai.GENAI_CONFIG).read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == "libcopy.so"
    assert (folder / "libcopy.so").read_bytes() == (elsewhere / "libcopy.so").read_bytes()


def test_model_without_kv_cache_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4,
                                                      "hidden_size": 64}))
    with pytest.raises(SerqError, match="no KV cache genai can feed"):
        genai.write_genai_config(tmp_path)


def test_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    from serq_onnx import cli

    assert cli.main(["genai-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("serq-onnx: error:") and "config.json" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_folder_genai_cannot_load(og, tmp_path):
    with pytest.raises(SerqError, match="onnxruntime-genai cannot load"):
        genai.generate(tmp_path, PROMPT, 4)
