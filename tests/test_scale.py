"""Conversion at scale: calibration defaults, external-data models, memory accounting, and the
synthetic-model and calibration-curve scripts."""

from __future__ import annotations

import importlib.util
import inspect as pyinspect
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from serq_onnx import calibration, converter
from serq_onnx.inspect import inspect_model

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_calibration_defaults_are_one_setting_everywhere():
    """convert(), inspect and the CLI take the calibration size of calibration.DEFAULT_*, the
    size RESULTS-scale.md chose from its curve."""
    from serq_onnx.cli import build_parser

    want = (calibration.DEFAULT_SAMPLES, calibration.DEFAULT_SEQLEN)
    assert want == (64, 512)
    for fn in (converter.convert, inspect_model):
        params = pyinspect.signature(fn).parameters
        assert (params["calib_samples"].default, params["calib_seqlen"].default) == want
    args = build_parser().parse_args(["convert", "m.onnx", "-o", "out"])
    assert (args.calib_samples, args.calib_seqlen) == want


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = ir.load(path)
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def test_external_data_model_converts_bit_for_bit(tiny_llama, tiny_llama_external, tmp_path):
    """A model whose weights are external data (as every export over 2 GB is) converts to the
    same SerqMatMul inputs, bit for bit, as the same model in one file, and its output keeps
    its weights in external data beside it."""
    src = tiny_llama.onnx_path.parent
    ext_dir = tiny_llama_external.parent
    assert (ext_dir / "model.onnx_data").stat().st_size > 100_000
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, 64) for _ in range(2)]
    kw = dict(calib_ids=ids, verify=False, progress=False, log=lambda *_: None)
    a = converter.convert(src / "model.onnx", tmp_path / "a", **kw)
    b = converter.convert(ext_dir / "model.onnx", tmp_path / "b", **kw)
    assert a.serq_nodes == b.serq_nodes > 0
    assert (tmp_path / "b" / "model.onnx.data").is_file()
    ia, ib = _initializers(tmp_path / "a" / "model.onnx"), _initializers(tmp_path / "b" /
                                                                         "model.onnx")
    assert ia.keys() == ib.keys()
    for name in ia:
        assert ia[name].dtype == ib[name].dtype and np.array_equal(ia[name], ib[name]), name


def test_report_records_peak_memory_per_stage(tiny_llama, tmp_path):
    """Each stage's peak resident memory is in the report (never decreasing: it is the
    process's peak so far) and the summary names the largest."""
    ids = [np.arange(2, 66) % 300]
    rep = converter.convert(tiny_llama.onnx_path, tmp_path / "o", calib_ids=ids, verify=False,
                            progress=False, log=lambda *_: None)
    rss = rep.peak_rss_mib
    assert {"load, attention", "calibrate", "verify_fold", "gptq", "save"} <= rss.keys()
    values = list(rss.values())
    assert values == sorted(values) and values[0] > 50  # a Python process with onnxruntime
    assert f"peak memory: {max(values):.0f} MiB" in rep.summary()


def test_synthetic_llama_sizes_count_parameters():
    """The script's parameter formula is transformers' own count (tiny size, no export), and
    its named sizes are the ~0.5B and ~1.5B the scale measurements need."""
    pytest.importorskip("torch")
    mod = _load_script(ROOT / "scripts" / "make_synthetic_llama.py")
    assert 0.4e9 < mod.param_count(**mod.SIZES["0.5b"]) < 0.6e9
    assert 1.3e9 < mod.param_count(**mod.SIZES["1.5b"]) < 1.7e9
    import transformers

    cfg = transformers.LlamaConfig(tie_word_embeddings=False, **mod.SIZES["tiny"])
    with transformers.modeling_utils.no_init_weights():
        model = transformers.LlamaForCausalLM(cfg)
    assert mod.param_count(**mod.SIZES["tiny"]) == model.num_parameters()


def test_calib_curve_points_parse():
    mod = _load_script(ROOT / "benchmarks" / "calib_curve.py")
    assert mod.parse_points("w4a8:32x512, w4a4:8X2048,") == [("w4a8", 32, 512),
                                                              ("w4a4", 8, 2048)]
    table = mod.table([{"scheme": "w4a8", "samples": 8, "seqlen": 512, "tokens": 4096,
                        "convert_s": 61.0, "timings": {"calibration": 20.0}, "ppl": 23.5}])
    assert "| w4a8 | 8 x 512 | 4096 | 23.500 | 61 | 20 | 0 |" in table


def test_float32_gram_sum_gives_the_gptq_codes_of_a_float64_one(tiny_llama, monkeypatch):
    """Summing the per-sequence Gram matrices in float32 (half the memory of float64) moves
    them by float32 rounding only, and GPTQ on the resulting Hessians picks the same codes."""
    from serq_onnx import passes
    from serq_onnx.modelio import load_model
    from serq_onnx.passes.gptq import gptq_quantize
    from serq_onnx.plan import ConvertConfig, Plan

    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 300, 48) for _ in range(24)]
    grams = {}
    for dtype in (np.float64, np.float32):
        monkeypatch.setattr(passes.calibrate, "GRAM_DTYPE", dtype)
        model = load_model(tiny_llama.onnx_path)
        plan = Plan(ConvertConfig(weight_quant="gptq", lm_head="float"))
        passes.FindTargetsPass(plan)(model)
        passes.CalibratePass(plan, seqs, progress=False)(model)
        grams[dtype] = [(g.gram, g.targets[0].weight_f32()) for g in plan.groups]
    for (g64, w), (g32, _) in zip(grams[np.float64], grams[np.float32]):
        assert g32.dtype == np.float32
        # 24 float32 additions: each entry within 24 * 2^-24 of the float64 sum's magnitude.
        np.testing.assert_allclose(g32, g64, rtol=0, atol=24 * 2.0 ** -24 * np.abs(g64).max())
        h64 = g64 / len(seqs) + np.eye(len(g64)) * 1e-3
        h32 = g32.astype(np.float64) / len(seqs) + np.eye(len(g64)) * 1e-3
        c64, s64 = gptq_quantize(w, h64, 4, 32)
        c32, s32 = gptq_quantize(w, h32, 4, 32)
        # A code may flip where the float64 value sits on a rounding boundary; none did on
        # this model, and at most 1 in 1000 may.
        assert np.mean(c64 != c32) <= 1e-3
        np.testing.assert_allclose(s32, s64, rtol=1e-5)


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path``."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            current = len(head) >= 6 and head[-1] == str(path)
        elif current and head and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_sessions_without_prepacking_read_the_weights_where_the_file_maps_them(
        tiny_llama_external):
    """``low_memory``'s sessions: the weights stay in the mapped external data file (page
    cache, held once) instead of a copy in the session; the logits are those of the usual
    session up to float rounding."""
    from serq_onnx import compare

    path = tiny_llama_external
    data = (path.parent / "model.onnx_data").resolve()
    ids = np.arange(2, 66) % 300
    logits, mapped = {}, {}
    for prepack in (True, False):
        sess = compare.cpu_session(path, prepack=prepack)
        logits[prepack] = compare.logits(sess, ids)
        mapped[prepack] = _mapped_kib(data)
        del sess
    size_kib = data.stat().st_size // 1024
    # prepacked, only the weights no GEMM packs (the embedding the Gather reads) stay mapped
    assert mapped[False] >= 0.9 * size_kib, mapped
    assert mapped[True] <= 0.5 * size_kib, mapped
    np.testing.assert_allclose(logits[False], logits[True], rtol=0, atol=1e-4)


@pytest.mark.parametrize("model, low_memory, prepacked", [
    ("tiny_llama_external", True, False),  # --low-memory
    ("tiny_llama_fp16", False, False),  # FP16: prepacking would copy its weights to float32
    ("tiny_llama", False, True),  # float32 by default: prepacked, the faster sessions
])
def test_which_float_sessions_prepack(model, low_memory, prepacked, request, tmp_path,
                                      monkeypatch):
    """Checks, calibration and the final verification: each float session under
    ``low_memory`` or of an FP16 graph maps its weights as they are; only the converted
    model's sessions (SerqMatMul, whose weights are already small) are the usual kind.
    ``low_memory`` is recorded in serq_config.json."""
    import json

    from serq_onnx import compare
    from serq_onnx.passes import calibrate

    opened: list[tuple[str, bool]] = []
    real_cpu, real_stats = compare.cpu_session, calibrate.statistics_session

    def cpu_session(path, with_ops=False, prepack=True):
        opened.append(("converted" if with_ops else "float", prepack))
        return real_cpu(path, with_ops=with_ops, prepack=prepack)

    def statistics_session(path, names, threads=0, prepack=True):
        opened.append(("calibration", prepack))
        return real_stats(path, names, threads=threads, prepack=prepack)

    monkeypatch.setattr(compare, "cpu_session", cpu_session)
    monkeypatch.setattr(calibrate, "statistics_session", statistics_session)
    path = request.getfixturevalue(model)
    path = getattr(path, "onnx_path", path)
    ids = [np.arange(2, 66) % 300]
    converter.convert(path, tmp_path / "o", calib_ids=ids, low_memory=low_memory,
                      gram_memory_mib=0, progress=False, log=lambda *_: None)
    kinds = {k for k, _ in opened}
    assert kinds == {"float", "calibration", "converted"}, opened
    assert all(prepack is prepacked for kind, prepack in opened if kind != "converted"), \
        str(opened)
    assert all(prepack for kind, prepack in opened if kind == "converted"), opened
    assert sum(kind == "calibration" for kind, _ in opened) > 1  # the Gram chunk passes too
    config = json.loads((tmp_path / "o" / "serq_config.json").read_text())
    assert config["config"]["low_memory"] is low_memory


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_low_memory_sessions_hold_no_float32_copy_of_fp16_weights(tmp_path):
    """onnxruntime's CPU provider has no FP16 MatMul: it inserts casts, and its optimizer
    folds them into float32 copies of the weights (twice the FP16 bytes). ``low_memory``'s
    sessions cast at run time instead and keep nothing; their results agree to FP16 rounding
    (the GEMM sums in another order without prepacked weights)."""
    from serq_onnx import compare

    K, N = 1024, 8192  # 16 MiB of FP16 weights, 32 MiB as float32
    w = (np.random.default_rng(0).standard_normal((K, N)) * 0.05).astype(np.float16)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, K])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1, N])],
        [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                    str(path), save_as_external_data=True, location="m.onnx_data")
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float16)
    held, out = {}, {}
    for prepack in (True, False):
        before = _anon_kib()
        sess = ort.InferenceSession(str(path), compare.session_options(prepack),
                                    providers=["CPUExecutionProvider"])
        out[prepack] = sess.run(None, {"x": x})[0]
        held[prepack] = _anon_kib() - before
        del sess
    copy_kib = K * N * 4 // 1024
    assert held[True] >= 0.8 * copy_kib, held
    assert held[False] <= 0.25 * copy_kib, held
    y = out[True].astype(np.float32)
    np.testing.assert_allclose(out[False].astype(np.float32), y, rtol=0,
                               atol=2e-3 * float(np.abs(y).max()))
