"""GPTQ Gram matrices in bounded memory (``--gram-memory``): the chunk plan, bit-identity with
the all-at-once conversion, the cut statistics graphs, the temporary float graph's lifetime, and
what ``inspect`` / ``--dry-run`` and the report say.

The tiny Llama has 9 input groups in graph order: per layer q/k/v (K 64), o (64), gate/up (64),
down (160), then the LM head (64); K = 64 is 16 KiB of float32 Gram matrix, 160 is 100 KiB,
all of them 312 KiB (0.305 MiB).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from serq_onnx import gram_chunks, inspect, pipeline
from serq_onnx.cli import main
from serq_onnx.converter import convert
from serq_onnx.errors import SerqError
from serq_onnx.plan import ConvertConfig, Plan

TINY_KS = [64, 64, 64, 160, 64, 64, 64, 160, 64]
# 0.12 MiB = 125.8 KiB: [q0 o0 gate0] [down0 q1] [o1 gate1] [down1 head]
FOUR_CHUNKS = 0.12
QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def calib_ids(tiny_llama):
    rng = np.random.default_rng(11)
    return [rng.integers(0, tiny_llama.config["vocab_size"], 48, dtype=np.int64)
            for _ in range(4)]


def test_plan_chunks_in_order_within_the_budget():
    kib = 1 / 1024
    assert gram_chunks.plan_chunks(TINY_KS, 4096) == [list(range(9))]
    assert gram_chunks.plan_chunks(TINY_KS, float("inf")) == [list(range(9))]
    assert gram_chunks.plan_chunks(TINY_KS, 312 * kib) == [list(range(9))]  # exactly fits
    chunks = gram_chunks.plan_chunks(TINY_KS, FOUR_CHUNKS)
    assert chunks == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    # A budget below one group's Gram matrix (down: 100 KiB > 50 KiB): that group alone.
    assert gram_chunks.plan_chunks(TINY_KS, 50 * kib) == [[0, 1, 2], [3], [4, 5, 6], [7], [8]]
    assert gram_chunks.plan_chunks(TINY_KS, 0) == [[i] for i in range(9)]
    assert gram_chunks.plan_chunks([], 1) == []
    for budget in (0, 0.05, FOUR_CHUNKS, 0.2, 1):
        chunks = gram_chunks.plan_chunks(TINY_KS, budget)
        assert [i for c in chunks for i in c] == list(range(9))  # all, in order, once
        for c in chunks:
            size = sum(gram_chunks.gram_nbytes(TINY_KS[i]) for i in c)
            assert len(c) == 1 or size <= budget * 2**20
    assert [gram_chunks.calibration_passes(n) for n in (0, 1, 2, 9)] == [1, 1, 3, 10]


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "4096", None])
def test_budget_must_be_a_number_of_mib(bad):
    with pytest.raises(SerqError, match="--gram-memory must be a number of MiB >= 0"):
        ConvertConfig(gram_memory_mib=bad)


def test_default_budget_is_a_quarter_of_the_model_within_bounds():
    """SmolLM2-135M (0.5 GiB) keeps its one pass, the 1.5B Llama (5.5 GiB) gets 1.4 GiB, an
    8B (30 GiB) the 4 GiB cap."""
    gib = 2**30
    assert gram_chunks.default_budget(int(0.5 * gib)) == gram_chunks.GRAM_MEMORY_FLOOR_MIB
    assert gram_chunks.default_budget(int(5.49 * gib)) == round(5.49 * 1024 / 4)
    assert gram_chunks.default_budget(30 * gib) == gram_chunks.DEFAULT_GRAM_MEMORY_MIB
    assert gram_chunks.default_budget(0) == gram_chunks.GRAM_MEMORY_FLOOR_MIB
    # --low-memory: a sixteenth, so that the sweep stays under its leaner float checks
    assert gram_chunks.default_budget(30 * gib, low_memory=True) == 30 * 1024 / 16


def _initializers(folder: Path) -> dict[str, bytes]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _assert_same_model(got: Path, want: Path) -> None:
    a, b = _initializers(got), _initializers(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} of {len(a)} initializers differ, e.g. {differ[:3]}"
    assert (onnx.load(str(got / "model.onnx"), load_external_data=False).graph ==
            onnx.load(str(want / "model.onnx"), load_external_data=False).graph)


@pytest.mark.parametrize("fixture,method", [("tiny_llama", "serq"), ("tiny_llama", "l2qer"),
                                            ("tiny_llama_fp16", "serq")])
def test_chunked_conversion_is_bit_identical(request, tmp_path, calib_ids, fixture, method):
    """4 chunks and 9 (one group each, budget 0) give the all-at-once model bit for bit: the
    same float32 Gram sums in the same order. l2qer with GPTQ also takes its |x| sums from the
    per-channel pass; FP16 exports cast to float32 in the statistics graph."""
    model = request.getfixturevalue(fixture).onnx_path
    kw = dict(calib_ids=calib_ids, rank=16, group_w=32, method=method, weight_quant="gptq",
              **QUIET)
    whole = convert(model, tmp_path / "whole", **kw)
    assert (whole.gram_passes, whole.calibration_passes, whole.gram_seconds) == (1, 1, 0.0)
    assert whole.config["gram_memory_mib"] == gram_chunks.GRAM_MEMORY_FLOOR_MIB  # the default
    for budget, chunks in ((FOUR_CHUNKS, 4), (0, 9)):
        out = tmp_path / f"chunked-{budget}"
        rep = convert(model, out, gram_memory_mib=budget, **kw)
        assert rep.gram_passes == chunks and rep.calibration_passes == chunks + 1
        assert rep.gram_seconds > 0 and rep.config["gram_memory_mib"] == budget
        assert f"Gram matrices in {chunks} chunks" in rep.summary()
        assert rep.peak_rss_mib.keys() == whole.peak_rss_mib.keys()  # recorded as before
        assert rep.verify == whole.verify and rep.op_check.split("(")[0] == (
            whole.op_check.split("(")[0])
        _assert_same_model(out, tmp_path / "whole")


def _recording_runner(monkeypatch):
    """Record each statistics model the conversion runs: its folder's files, graph outputs and
    node names (then run it as usual)."""
    from serq_onnx import passes

    seen: list[dict] = []
    real = passes.calibrate.run_statistics

    def record(path, names, sequences, *, prepack=True):
        proto = onnx.load(str(path), load_external_data=False)
        seen.append(dict(folder=path.parent, file=path.name,
                         files=sorted(p.name for p in path.parent.iterdir()),
                         outputs=[o.name for o in proto.graph.output],
                         nodes=[n.name for n in proto.graph.node], names=list(names)))
        return real(path, names, sequences, prepack=prepack)

    monkeypatch.setattr(passes.calibrate, "run_statistics", record)
    return seen


def test_chunk_graphs_stop_at_their_deepest_layer(tiny_llama, tmp_path, calib_ids,
                                                  monkeypatch):
    """The per-channel pass and each chunk run graphs with only their statistic outputs (no
    logits, no KV cache), pruned after their deepest group input; all refer to the one saved
    copy of the float weights. Each chunk after the first starts from the tensors the one before
    handed on (``serq_onnx.graph_cut``), so the chunk passes together run each node of the
    float graph once."""
    from serq_onnx.graph_cut import CARRY_SUFFIX

    seen = _recording_runner(monkeypatch)
    convert(tiny_llama.onnx_path, tmp_path / "o", calib_ids=calib_ids, rank=16,
            gram_memory_mib=FOUR_CHUNKS, verify=False, **QUIET)
    assert len(seen) == 5
    first, chunks = seen[0], seen[1:]
    assert first["folder"].name.startswith("serq-grams-")
    assert all(s["folder"] == first["folder"] for s in chunks)
    for c, s in enumerate(seen):  # the float graph, its data, this statistics model (and the
        fed = [f"carry-{c - 1}"] if c >= 2 else []  # tensors handed on to it)
        assert s["files"] == sorted(["float.onnx", "float.onnx.data", s["file"], *fed])
        assert s["outputs"] == s["names"]
        assert "logits" not in s["outputs"] and not any(o.startswith("present.")
                                                       for o in s["outputs"])
    assert all(n.endswith("/absmax") for n in first["outputs"]) and len(first["outputs"]) == 9
    want_groups = [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    for c, (s, groups) in enumerate(zip(chunks, want_groups)):
        stats = [o for o in s["outputs"] if not o.endswith(CARRY_SUFFIX)]
        assert stats == [f"serq_calib/{i}/gram" for i in groups]
        carried = len(s["outputs"]) - len(stats)
        assert (carried > 0) == (c < 3), "only the last chunk hands nothing on"
    layer1 = ["/layers.1/" in n for n in chunks[0]["nodes"]]
    assert not any(layer1), "chunk 1 (layer 0 only) still computes layer 1"
    assert any("/layers.1/" in n for n in chunks[1]["nodes"])  # q1's input is layer 1's norm
    assert not any("/layers.0/self_attn/" in n for s in chunks[1:] for n in s["nodes"])
    assert not any("lm_head" in n for s in seen for n in s["nodes"])  # the head is never run
    graph_nodes = [n for s in chunks for n in s["nodes"]
                   if not n.startswith("serq_calib/") and not n.endswith(CARRY_SUFFIX)]
    assert len(graph_nodes) == len(set(graph_nodes)), "a node ran in two chunk passes"
    assert len(graph_nodes) < len(first["nodes"])


def test_graph_cut_hands_on_what_later_passes_read():
    """A chain x -> a -> b -> t -> c with a side tensor s = Neg(x) that only the last chunk
    reads: the last pass computes s, so the graph input x is handed on through pass 1 (which
    does not read it) beside a; half-precision and control-flow graphs are not cut."""
    from serq_onnx.graph_cut import plan_cuts

    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[N] x) => (float[N] c) {
        a = Relu(x)
        s = Neg(x)
        b = Relu(a)
        t = Add(b, s)
        c = Relu(t)
    }"""
    model = ir.from_proto(onnx.parser.parse_model(text))
    cuts = plan_cuts(model, [["a"], ["b"], ["t"]])
    assert cuts.inputs == [[], ["x", "a"], ["x", "b"]]
    assert cuts.carry == [["x", "a"], ["x", "b"], []]
    assert plan_cuts(model, [["x"], ["t"]]).inputs == [[], ["x"]]  # a graph input, handed on
    half = ir.from_proto(onnx.parser.parse_model(text.replace("float", "float16")))
    assert plan_cuts(half, [["a"], ["b"]]) is None
    looped = ir.from_proto(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 18]>
    g (bool cond, float[N] x) => (float[N] y) {
        a = Relu(x)
        y = If(cond) <then_branch = t () => (float[N] o) { o = Neg(a) },
                      else_branch = e () => (float[N] o) { o = Relu(a) }>
    }"""))
    assert plan_cuts(looped, [["a"], ["y"]]) is None


@pytest.mark.parametrize("fail_in", ["salient", "gptq"])
def test_saved_float_graph_removed_after_success_and_failure(tiny_llama, tmp_path, calib_ids,
                                                             monkeypatch, fail_in):
    """The float graph kept for the chunks lives in a temporary folder of the run: gone after a
    conversion, and after one that fails between calibration and GPTQ or in GPTQ's second
    chunk (nothing written either)."""
    from serq_onnx import passes

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    seen = _recording_runner(monkeypatch)
    kw = dict(calib_ids=calib_ids, rank=16, gram_memory_mib=FOUR_CHUNKS, verify=False, **QUIET)
    convert(tiny_llama.onnx_path, tmp_path / "ok", **kw)
    assert seen and seen[0]["folder"].parent == tmp
    assert not seen[0]["folder"].exists() and list(tmp.iterdir()) == []

    seen.clear()
    if fail_in == "salient":
        def fail(self, model):
            raise SerqError("injected")
        monkeypatch.setattr(passes.SalientReconstructionPass, "call", fail)
    else:
        calls = []
        real = passes.gptq.run_job

        def fail(job):
            calls.append(job.name)
            if len(calls) == 4:  # the first group of the second chunk
                raise SerqError("injected")
            return real(job)
        monkeypatch.setattr(passes.gptq, "run_job", fail)
    with pytest.raises(SerqError, match="injected"):
        convert(tiny_llama.onnx_path, tmp_path / "bad", **kw)
    assert seen[0]["folder"].name.startswith("serq-grams-")
    assert len(seen) == (1 if fail_in == "salient" else 3)  # per-channel pass (+ chunks 1-2)
    assert not seen[0]["folder"].exists() and list(tmp.iterdir()) == []
    assert not (tmp_path / "bad").exists()


def _calibrated(tiny_llama, seqs, budget):
    from serq_onnx import passes
    from serq_onnx.modelio import load_model

    model = load_model(tiny_llama.onnx_path)
    plan = Plan(ConvertConfig(lm_head="float", rank=16, gram_memory_mib=budget))
    passes.FindTargetsPass(plan)(model)
    calib = passes.CalibratePass(plan, seqs, progress=False)
    calib(model)
    for p in (passes.FoldFlatteningPass, passes.PermuteWeightsPass,
              passes.SalientReconstructionPass):
        p(plan)(model)
    return model, plan, calib


def test_gptq_preconditions_name_the_saved_graph(tiny_llama, calib_ids):
    """Chunked calibration leaves no Gram matrix but a saved graph, which GPTQPass accepts;
    a removed one, or groups changed since, is refused by name. The pass removes it when
    done, and its Gram matrices are freed."""
    from serq_onnx import passes

    model, plan, calib = _calibrated(tiny_llama, calib_ids, FOUR_CHUNKS)
    source = plan.gram_source
    assert calib.chunks == [[0, 1, 2], [3, 4], [5, 6], [7]]  # no LM head group here
    assert all(g.gram is None and g.tokens == 4 * 48 for g in plan.groups)
    assert source is not None and (source.folder / source.FILE).is_file()
    gptq = passes.GPTQPass(plan, progress=False)
    gptq.requires(model)  # met
    plan.groups.reverse()
    with pytest.raises(ir.passes.PreconditionError, match="GPTQPass: the plan's groups changed"):
        gptq.requires(model)
    plan.groups.reverse()
    gptq(model)
    assert plan.gram_source is None and source.closed and not source.folder.exists()
    assert all(g.gram is None for g in plan.groups) and gptq.gram_seconds > 0
    assert all(t.weights is not None for t in plan.targets)

    model, plan, _ = _calibrated(tiny_llama, calib_ids, FOUR_CHUNKS)
    plan.gram_source.close()
    with pytest.raises(ir.passes.PreconditionError, match="GPTQPass: the saved float graph "
                       "of the Gram matrices was removed; run CalibratePass again"):
        passes.GPTQPass(plan, progress=False)(model)
    doc = pipeline.STEPS[[s.name for s in pipeline.STEPS].index("gptq")].requires()
    assert "saved float graph" in doc and "SalientReconstructionPass" in doc


def test_all_fitting_budget_collects_in_calibration(tiny_llama, calib_ids):
    """Within the budget nothing is saved: calibration holds every Gram matrix, as before."""
    _, plan, calib = _calibrated(tiny_llama, calib_ids, 0.31)
    assert plan.gram_source is None and calib.chunks == [list(range(8))]
    assert all(g.gram is not None and g.gram.shape == (g.K, g.K) for g in plan.groups)


def test_ray_runs_the_chunks_too(tiny_llama, tmp_path, calib_ids, monkeypatch):
    """With --ray the chunks' sequences go through the cluster's runner as calibration's do
    (none in this process), and the model equals the one-process all-at-once one."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    import os

    from serq_onnx.ray_cluster import LOOPBACK_ENV

    os.environ.setdefault(LOOPBACK_ENV, "0")
    kw = dict(calib_ids=calib_ids, rank=16, group_w=32, group_a=32, fuse_attention=False,
              verify=False, **QUIET)
    convert(tiny_llama.onnx_path, tmp_path / "local", **kw)
    was_running = ray.is_initialized()
    here = _recording_runner(monkeypatch)
    rep = convert(tiny_llama.onnx_path, tmp_path / "ray", ray="auto",
                  gram_memory_mib=FOUR_CHUNKS, **kw)
    assert rep.gram_passes == 4 and here == []
    assert ray.is_initialized() == was_running
    _assert_same_model(tmp_path / "ray", tmp_path / "local")


def test_inspect_and_dry_run_report_the_calibration_passes(tiny_llama, tmp_path, calib_ids,
                                                           capsys):
    from serq_onnx.inspect import inspect_model

    model = tiny_llama.onnx_path
    kw = dict(rank=16, calib_samples=2, calib_seqlen=32, log=lambda *a: None)
    whole = inspect_model(model, **kw)
    chunked = inspect_model(model, gram_memory_mib=FOUR_CHUNKS, **kw)
    rtn = inspect_model(model, method="rtn", **kw)
    assert (whole.calibration_passes, whole.gram_passes) == (1, 1)
    assert (chunked.calibration_passes, chunked.gram_passes) == (5, 4)
    assert (rtn.calibration_passes, rtn.gram_passes) == (0, 0)
    assert whole.gram_bytes == chunked.gram_bytes == 4 * sum(k * k for k in TINY_KS)
    assert chunked.gram_chunk_bytes == 4 * (64 * 64 + 160 * 160)
    assert "calibration passes: 5 (per-channel statistics, then Gram matrices in 4 chunks" in (
        chunked.summary())
    assert "calibration passes: 1 (per-channel statistics and all Gram matrices" in (
        whole.summary())
    by_name = {p["name"]: p["purpose"] for p in chunked.passes}
    assert "in 4 chunks" in by_name["gptq"] and "kept on disk" in by_name["calibrate"]
    assert "chunks" not in {p["name"]: p["purpose"] for p in whole.passes}["gptq"]
    # the sweep holds the largest chunk's Gram matrices, not all of them (test_inspect checks
    # the amount where the sweep is the peak; here the float checks are)
    assert chunked.estimate_peak_bytes <= whole.estimate_peak_bytes
    # a real conversion makes the passes inspect says
    rep = convert(model, tmp_path / "o", calib_samples=2, calib_seqlen=32, rank=16,
                  gram_memory_mib=FOUR_CHUNKS, verify=False, progress=False,
                  log=lambda *a: None)
    assert (rep.calibration_passes, rep.gram_passes) == (5, 4)
    assert rep.config == chunked.config

    out = tmp_path / "dry"
    assert main(["convert", str(model), "-o", str(out), "--dry-run", "--gram-memory",
                 str(FOUR_CHUNKS)]) == 0
    assert "calibration passes: 5" in capsys.readouterr().out and not out.exists()
    assert main(["inspect", str(model), "--gram-memory", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["calibration_passes"], data["gram_passes"]) == (10, 9)
    assert data["config"]["gram_memory_mib"] == 0
    assert main(["inspect", str(model), "--gram-memory", "-5"]) == 2
    assert "--gram-memory must be a number of MiB >= 0" in capsys.readouterr().err


def test_estimate_adds_the_chunks_forward_pass(tiny_llama):
    """The chunk passes start where the one before stopped: together they run the linears
    before the last chunk's deepest group (group 8 of 9: the decoder, not the head) once."""
    from serq_onnx import inspect as insp
    from serq_onnx import passes
    from serq_onnx.modelio import load_model

    secs = {}
    for budget in (4096, FOUR_CHUNKS):
        plan = Plan(ConvertConfig(rank=16, gram_memory_mib=budget))
        passes.UntieLMHeadPass()(model := load_model(tiny_llama.onnx_path))
        passes.FindTargetsPass(plan)(model)
        secs[budget] = insp.estimate(plan, 10**6, 64, 10**6, 320)[0]
    flops = [2.0 * sum(t.K * t.N for t in g.targets) for g in plan.groups]
    want = sum(flops[:8]) * 10**6 / insp.FORWARD_FLOPS_PER_S
    extra = secs[FOUR_CHUNKS]["calibration"] - secs[4096]["calibration"]
    assert extra == pytest.approx(want, rel=1e-9) and extra > 0
    assert secs[FOUR_CHUNKS]["gptq"] == secs[4096]["gptq"]


@pytest.mark.parametrize("hand_on", [False, True])
def test_each_sequences_outputs_freed_before_the_next_runs(tmp_path, hand_on):
    """A sequence's statistics (one set is as large as the Gram sums) are dropped before the
    runner makes the next sequence's: summing holds the sums and one set, not two; also through
    the chunk pass that hands tensors on."""
    import weakref

    from serq_onnx.passes.calibrate import SavedFloatGraph, accumulate

    seqs = [np.zeros(5, np.int64)] * 3
    alive: list = []

    def runner():
        for _ in seqs:
            held = [r for r in alive if r() is not None]
            assert not held, "the previous sequence's outputs are still held"
            outs = [np.ones(4, np.float32), np.ones((4, 4), np.float32), np.ones(2, np.float32)]
            alive.append(weakref.ref(outs[1]))
            yield outs
            outs = None

    results = runner()
    if hand_on:
        results = SavedFloatGraph._hand_on(results, 2, tmp_path / "carry")
    _, _, grams, tokens = accumulate(seqs, results, [4], True, False, True, progress=False)
    assert tokens == 15 and np.all(grams[0] == 3) and len(alive) == 3
    if hand_on:
        assert sorted(p.name for p in (tmp_path / "carry").iterdir()) == ["0.npz", "1.npz",
                                                                          "2.npz"]


def test_no_room_for_the_handed_on_tensors_is_a_clear_error(tiny_llama, tmp_path, calib_ids,
                                                             monkeypatch):
    """A full disk while a chunk pass saves what it hands on: an error naming the folder and
    what to do; no output, and the temporary folder is gone."""
    import errno

    from serq_onnx import passes

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(passes.calibrate.np, "savez", full)
    with pytest.raises(SerqError, match=r"cannot save the tensors one Gram pass hands on .*"
                       r"No space left on device.*TMPDIR"):
        convert(tiny_llama.onnx_path, tmp_path / "out", calib_ids=calib_ids, rank=16,
                gram_memory_mib=FOUR_CHUNKS, verify=False, **QUIET)
    assert not (tmp_path / "out").exists() and list(tmp.iterdir()) == []
