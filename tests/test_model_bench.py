"""The whole-model CPU benchmark and the decode profile, on tiny Optimum-exported Llamas."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serq_onnx import model_bench as mb
from serq_onnx.errors import SerqError
from serq_onnx.evaluate import decode_speed

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(rank=16, group_w=32, group_a=32)


def _ids(vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n, dtype=np.int64)


@pytest.fixture(scope="module")
def serq_tiny(tiny_llama, tmp_path_factory):
    """``tiny_llama`` converted to SERQ w4a8 with a small calibration."""
    from serq_onnx.converter import convert

    mb.ensure_passes()  # a source checkout on PYTHONPATH: the passes live beside the package
    vocab = tiny_llama.config["vocab_size"]
    out = tmp_path_factory.mktemp("serq_tiny") / "w4a8"
    convert(tiny_llama.onnx_path, out, scheme="w4a8", progress=False, log=lambda *a: None,
            calib_ids=[_ids(vocab, 32, s) for s in (1, 2)], **SETTINGS)
    return out / "model.onnx"


def _cli():
    spec = importlib.util.spec_from_file_location("cpu_model_bench",
                                                  REPO / "benchmarks" / "cpu_model_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_counts_and_table(tiny_llama, serq_tiny):
    prompt = _ids(tiny_llama.config["vocab_size"], 24, 3)
    results = [mb.bench_onnx(mb.Variant("float32", tiny_llama.onnx_path), prompt,
                             decode_tokens=6, reps=2, threads=1),
               mb.bench_onnx(mb.Variant("serq-w4a8", serq_tiny), prompt, decode_tokens=6,
                             reps=2, threads=1, spinning=False)]
    for r in results:
        assert (r.prompt_tokens, r.decode_tokens, r.reps) == (24, 6, 2)
        assert len(r.tokens) == 7  # the prefill's token and one per decode step
        assert len(r.prefill_seconds) == len(r.decode_seconds) == 2
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
        assert r.size_bytes == Path(r.variant == "float32" and tiny_llama.onnx_path
                                    or serq_tiny).stat().st_size
    rows = mb.ratio_rows(results)
    assert rows[0]["prefill_x"] == rows[0]["decode_x"] == pytest.approx(1.0)
    assert rows[1]["decode_x"] == pytest.approx(results[1].decode_tokens_per_s
                                                / results[0].decode_tokens_per_s)
    table, md = mb.format_table(results), mb.format_markdown(results)
    assert rows[0]["prefill_paired"] == rows[0]["decode_paired"] == pytest.approx(1.0)
    pairs = [a / b for a, b in zip(results[0].decode_seconds, results[1].decode_seconds)]
    assert rows[1]["decode_paired"] == pytest.approx(float(np.median(pairs)))
    assert "serq-w4a8" in table and len([ln for ln in md.splitlines() if ln.startswith("| ")]) == 4
    with pytest.raises(SerqError):
        mb.bench_onnx(mb.Variant("float32", tiny_llama.onnx_path), prompt, decode_tokens=0)


@pytest.mark.parametrize("which", ["float", "serq"])
def test_io_binding_tokens_equal_numpy_path(tiny_llama, serq_tiny, which):
    path = tiny_llama.onnx_path if which == "float" else serq_tiny
    prompt = _ids(tiny_llama.config["vocab_size"], 17, 4)
    bound = decode_speed(path, prompt, new_tokens=12, io_binding=True)
    plain = decode_speed(path, prompt, new_tokens=12, io_binding=False)
    assert bound["tokens"] == plain["tokens"] and len(bound["tokens"]) == 12


def test_cli_end_to_end(tiny_llama, serq_tiny, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 20)
    out = tmp_path / "bench.json"
    rc = _cli().main(["--float", str(tiny_llama.onnx_path), "--serq-w4a8", str(serq_tiny.parent),
                      "--variants", "float32,serq-w4a8", "--text", str(text),
                      "--prompt-tokens", "20", "--decode-tokens", "5", "--reps", "1",
                      "--threads", "1", "--json", str(out), "--markdown", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| serq-w4a8 (SerqMatMul) |" in printed and "machine:" in printed
    data = json.loads(out.read_text())
    assert data["prompt_tokens"] == 20 and data["decode_tokens"] == 5
    assert set(data["variants"]) == {"float32", "serq-w4a8"}
    for v in data["variants"].values():
        assert v["prompt_tokens"] == 20 and v["decode_tokens"] == 5 and len(v["tokens"]) == 6
    assert not list(tmp_path.glob(".bench.json.tmp-*"))


def test_llama_cpp_skipped_with_a_reason(tiny_llama, monkeypatch):
    monkeypatch.setattr(mb, "llama_cpp_version", lambda: None)
    cli = _cli()
    monkeypatch.setattr(cli.mb, "llama_cpp_version", lambda: None)
    args = cli.parse_args(["--float", str(tiny_llama.onnx_path), "--variants", "llama.cpp"])
    variants, skipped = cli.build_variants(args, ["llama.cpp"])
    assert variants == [] and "llama_cpp" in skipped[0]


def _hand_built(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Two 'layers' and a head: const-weight MatMuls (an initializer, a Constant node), an
    activation x activation MatMul, and elementwise ops; every node named."""
    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W0")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["a"], name="/model/layers.0/mlp/MatMul"),
        helper.make_node("Relu", ["a"], ["b"], name="/model/layers.0/Relu"),
        helper.make_node("Add", ["b", "X"], ["c"], name="/model/layers.0/Add"),
        helper.make_node("Constant", [], ["W1"], name="/model/layers.1/Constant",
                         value=numpy_helper.from_array(np.eye(8, dtype=np.float32))),
        helper.make_node("MatMul", ["c", "W1"], ["d"], name="/model/layers.1/proj/MatMul"),
        helper.make_node("Transpose", ["d"], ["dt"], name="/model/layers.1/Transpose"),
        helper.make_node("MatMul", ["d", "dt"], ["e"], name="/model/layers.1/scores/MatMul"),
        helper.make_node("Sigmoid", ["e"], ["f"], name="/model/layers.1/Sigmoid"),
        helper.make_node("MatMul", ["f", "d"], ["g"], name="/model/layers.1/mix/MatMul"),
        helper.make_node("MatMul", ["g", "W2"], ["Y"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                         [4, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 4])],
                              initializer=[w0, w2])
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path, {"MatMul": 5, "Relu": 1, "Add": 1, "Constant": 1, "Transpose": 1, "Sigmoid": 1}


def test_int8_baselines_full_and_reduced_range(tiny_llama, tmp_path):
    """The dynamic int8 baselines quantize every decoder linear to QInt8: full range (codes up
    to +-127) and, with reduce_range, 7 bits (|code| <= 64, onnxruntime's remedy for CPUs
    without VNNI); each is built once and found again by its record."""
    full = mb.build_int8(tiny_llama.onnx_path, tmp_path)
    rr = mb.build_int8(tiny_llama.onnx_path, tmp_path, reduce_range=True)
    assert (full.parent.name, rr.parent.name) == ("ort-int8", "ort-int8-reduce-range")
    peaks = {}
    for path in (full, rr):
        model = onnx.load(str(path))
        qs = [numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type == TensorProto.INT8 and len(t.dims) == 2]  # weights, not zeros
        assert len(qs) == 7 * tiny_llama.config["num_hidden_layers"]  # q k v o gate up down
        peaks[path.parent.name] = max(int(np.abs(q.astype(np.int32)).max()) for q in qs)
        assert json.loads((path.parent / mb.INT8_CONFIG_FILE).read_text())["reduce_range"] == (
            path == rr)
    assert peaks["ort-int8"] > 100 and peaks["ort-int8-reduce-range"] <= 64
    stamp = rr.stat().st_mtime_ns
    assert mb.build_int8(tiny_llama.onnx_path, tmp_path, reduce_range=True) == rr
    assert rr.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_node_counts_and_linear_nodes(tmp_path):
    path, by_op = _hand_built(tmp_path)
    counts = mb.model_node_counts(path)
    assert counts["total"] == 10 and counts["by_op"] == by_op
    assert counts["per_layer"] == {"0": 3, "1": 6} and counts["layers"] == 2
    assert counts["outside_layers"] == 1 and counts["nodes_per_layer"] == 4.5
    assert counts["first_layer_by_op"] == {"MatMul": 1, "Relu": 1, "Add": 1}
    linear = mb.linear_nodes(onnx.load(str(path)).graph)
    assert linear == {"/model/layers.0/mlp/MatMul", "/model/layers.1/proj/MatMul",
                      "/lm_head/MatMul"}


def test_profile_aggregation_on_a_real_profile(tmp_path):
    import onnxruntime as ort

    path, by_op = _hand_built(tmp_path)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.ones((4, 8), np.float32)
    for _ in range(5):
        sess.run(None, {"X": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    linear = mb.linear_nodes(onnx.load(str(path)).graph)
    agg = mb.aggregate_profile(events, linear, last_runs=3)
    assert agg["runs"] == 3
    total = sum(v["us"] for v in agg["by_op"].values())
    assert total == pytest.approx(agg["kernel_us"])
    assert agg["linear_us"] + agg["other_us"] == pytest.approx(agg["kernel_us"])
    assert sum(v["share"] for v in agg["by_op"].values()) == pytest.approx(1.0)
    # Constant nodes do not run; every other node runs once per session run.
    expected_calls = {op: 3 * n for op, n in by_op.items() if op != "Constant"}
    assert {op: v["calls"] for op, v in agg["by_op"].items()} == expected_calls
    assert agg["linear_ops"] == ["MatMul"]
    assert agg["kernel_us"] <= agg["run_us"]
    with pytest.raises(SerqError):
        mb.aggregate_profile(events, linear, last_runs=6)


def test_profile_aggregation_exact_on_synthetic_events():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    events = [run(0, 100), node("lin", "SerqMatMul", 10, 50),  # first run: left out
              run(200, 100), node("lin", "SerqMatMul", 210, 40), node("n", "Add", 260, 10),
              {"cat": "Node", "name": "n_fence_before", "ts": 259, "dur": 0},
              run(400, 80), node("lin", "SerqMatMul", 410, 30), node("/lm_head/MatMul", "MatMul",
                                                                     450, 20),
              node("stray", "Add", 1000, 5)]  # outside every run
    agg = mb.aggregate_profile(events, {"lin", "/lm_head/MatMul"}, last_runs=2)
    assert agg["run_us"] == 180 and agg["kernel_us"] == 100
    assert agg["linear_us"] == 90 and agg["other_us"] == 10 and agg["lm_head_us"] == 20
    assert agg["by_op"]["SerqMatMul"] == {"us": 70, "calls": 2, "share": 0.7}
    assert agg["by_op"]["Add"]["calls"] == 1 and agg["by_op"]["MatMul"]["us"] == 20
    assert list(agg["by_op"]) == ["SerqMatMul", "MatMul", "Add"]


def test_profile_decode_on_tiny(tiny_llama, serq_tiny):
    prompt = _ids(tiny_llama.config["vocab_size"], 16, 5)
    for path, linear_op in ((tiny_llama.onnx_path, "MatMul"), (serq_tiny, "SerqMatMul")):
        p = mb.profile_decode(path, prompt, steps=4, warmup_steps=1, threads=1)
        assert p.steps == 4 and p.prompt_tokens == 16
        assert linear_op in p.linear_ops
        assert p.linear_us_per_token + p.other_us_per_token == pytest.approx(
            p.kernel_us_per_token)
        assert sum(v["us_per_token"] for v in p.by_op.values()) == pytest.approx(
            p.kernel_us_per_token)
        assert p.nodes["layers"] == p.file_nodes["layers"] == tiny_llama.config[
            "num_hidden_layers"]
        assert p.nodes["total"] <= p.file_nodes["total"]
        assert "per token" in mb.format_profile("tiny", p)


def test_fusion_probe_on_tiny(tiny_llama, tmp_path, capsys):
    pytest.importorskip("onnxruntime.transformers.optimizer")
    spec = importlib.util.spec_from_file_location("ort_fusion_probe",
                                                  REPO / "benchmarks" / "ort_fusion_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 40)
    cfg = tiny_llama.config
    out = tmp_path / "probe.json"
    assert probe.main(["--float", str(tiny_llama.onnx_path), "--types", "gpt2", "--levels", "0",
                       "--num-heads", str(cfg["num_attention_heads"]), "--hidden-size",
                       str(cfg["hidden_size"]), "--work", str(tmp_path / "work"), "--text",
                       str(text), "--check-tokens", "16", "--threads", "1",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["optimizer"]["gpt2 opt_level 0"]
    assert entry["nodes"] < report["original_nodes"]
    assert entry["fused"].get("SkipSimplifiedLayerNormalization", 0) > 0
    assert entry["check"]["max_abs_diff"] < 1e-4 and entry["check"]["greedy_tokens_equal"]
    assert report["offline"]["ORT_ENABLE_ALL"]["nodes"] < report["original_nodes"]
    assert 0 < entry["as_run"]["nodes"] <= entry["nodes"]


class _FakeRunner:
    def __init__(self, name, log, tokens=(1, 2)):
        self.variant = mb.Variant(name, Path(__file__))
        self.prompt_tokens, self.decode_tokens, self.extra = 4, 2, {}
        self.log, self.tokens = log, list(tokens)

    def warmup(self):
        self.log.append((self.variant.name, "warmup"))

    def once(self):
        self.log.append((self.variant.name, "once"))
        return 0.5, 0.25, list(self.tokens)


def test_run_interleaved_order_and_medians():
    log = []
    results = mb.run_interleaved([_FakeRunner("a", log), _FakeRunner("b", log)], 2)
    assert log == [("a", "warmup"), ("b", "warmup"), ("a", "once"), ("b", "once"),
                   ("a", "once"), ("b", "once")]
    assert [r.variant for r in results] == ["a", "b"]
    assert results[0].prefill_tokens_per_s == 8 and results[0].decode_tokens_per_s == 8
    log.clear()
    mb.run_interleaved([_FakeRunner("a", log), _FakeRunner("b", log)], 2, interleave=False)
    assert [x for x in log if x[1] == "once"] == [("a", "once")] * 2 + [("b", "once")] * 2

    class Flaky(_FakeRunner):
        def once(self):
            self.tokens[0] += 1
            return super().once()

    with pytest.raises(SerqError, match="differ between repetitions"):
        mb.run_interleaved([Flaky("c", [])], 2)
