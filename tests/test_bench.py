"""`serq-onnx bench` times real kernels: its case models hold L independent nodes with distinct
weights that onnxruntime runs (none pruned, folded or fused), every kernel computes the layer it
claims to, and the reports list every kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import op_isa
import serq_onnx
from serq_onnx import bench, cli, reference

K, N, M = 256, 96, 5


def _w(seed=3, k=K, n=N):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def _rel_rms(got, want):
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


@pytest.mark.parametrize("bits_a,group_a", [(8, 128), (4, 32)])
def test_bench_serq_model_matches_reference(bits_a, group_a):
    rng = np.random.default_rng(3)
    K, N, M = 192, 80, 5
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = bench.serq_matmul(w, bits_a=bits_a, rank=32, group=64, group_a=group_a)
    proto = onnx.load_from_string(model)
    node = proto.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group_a"] == group_a and attrs["bits_a"] == bits_a
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    a = rng.standard_normal((M, K)).astype(np.float32)
    got = serq_onnx.session(model).run(None, {"A": a})[0]
    want = reference.serq_matmul(a, inits["B"], inits["scales"], inits["wsum"],
                                 act_perm=inits["act_perm"], **{k: attrs[k] for k in (
                                     "K", "N", "rank", "group_w", "group_a", "bits_a", "bits_w")})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_node_helpers_compute_the_layer():
    """The one-node builders other code imports still give one-node models of ``A @ w``."""
    w = _w()
    a = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
    want = a @ w
    # Per-tensor uint8 activations x per-column int8 weights: 1.1% here in exact integer
    # arithmetic. Without VNNI, onnxruntime's u8s8 kernel (pmaddubsw) saturates pair sums at
    # int16, which a numpy model of it puts at 3.5% for this layer.
    vnni = {"avx_vnni", "avx512_vnni"} & op_isa.cpu_flags()
    for model, tol in [(bench.float_matmul(w), 1e-5), (bench.matmul_nbits(w, 32, 0), 0.2),
                       (bench.matmul_nbits(w, 128, 4), 0.2),
                       (bench.dynamic_int8_matmul(w), 0.03 if vnni else 0.05),
                       (bench.serq_matmul(w, bits_a=8, rank=128, group=128, group_a=128), 0.2)]:
        proto = onnx.load_from_string(model)
        assert len(proto.graph.node) == 1 and [o.name for o in proto.graph.output] == ["Y"]
        assert _rel_rms(serq_onnx.session(model).run(None, {"A": a})[0], want) < tol


def test_chain_has_L_distinct_weights_and_L_outputs():
    layer = bench.make_layer("SerqMatMul w4a8", _w())
    chain = bench.Chain(layer, 4)
    model = chain.model(3)
    g = model.graph
    assert len(g.node) == 3 and all(n.input[0] == "A" for n in g.node)
    assert [o.name for o in g.output] == ["Y_0", "Y_1", "Y_2"]
    names = [t.name for t in g.initializer]
    assert len(names) == len(set(names)) == 3 * len(layer.weights)
    for role in ("B", "scales", "wsum"):
        copies = [chain.copies[i][role] for i in range(3)]
        for i in range(3):
            for j in range(i):
                assert not np.shares_memory(copies[i], copies[j])
                assert not np.array_equal(copies[i], copies[j]), role
    # the session keeps every output (nothing pruned)
    sess = chain.session(3)
    assert [o.name for o in sess.get_outputs()] == ["Y_0", "Y_1", "Y_2"]


def _profiled_ops(sess) -> list[str]:
    path = sess.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        os.remove(path)
    return [e["args"]["op_name"] for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_every_kernel_runs_L_nodes_and_computes_the_layer(kernel, tmp_path):
    """Each case model's node i computes ``A @ w[:, perm_i]``, checked against float MatMul.

    Tolerances (relative RMS on random normal weights): 4-bit round-to-nearest weights have a
    step of ~max|w|/7 per group, an error of ~0.1 of the output RMS (0.107-0.124 measured for
    MatMulNBits, 0.08 / 0.12 for SerqMatMul w4a8 / w4a4, whose 4-bit activations add ~0.08):
    < 0.2. Dynamic int8 (per-column int8 weights, per-tensor uint8 activations): ~0.012, < 0.03.
    """
    w = _w()
    a = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    L = 3
    chain = bench.Chain(bench.make_layer(kernel, w), L)
    sess = chain.session(L, profile_prefix=str(tmp_path / "prof"))
    outs = sess.run(None, {"A": a})
    assert len(outs) == L
    tol = 1e-5 if kernel == bench.FLOAT else 0.03 if kernel == bench.DYNAMIC_INT8 else 0.2
    for i, y in enumerate(outs):
        assert _rel_rms(y, a @ w[:, chain.perms[i]]) < tol, (kernel, i)
    # onnxruntime ran exactly L kernel nodes: none pruned, folded or fused together
    ops = _profiled_ops(sess)
    assert len(ops) == L, ops
    assert len(set(ops)) == 1


def test_dynamic_int8_fallback_matches_fused():
    w = _w()
    a = np.random.default_rng(2).standard_normal((M, K)).astype(np.float32)
    assert bench.has_dynamic_quantize_matmul()  # onnxruntime >= 1.21 has it on the CPU
    fused = serq_onnx.session(bench.dynamic_int8_matmul(w, fused=True)).run(None, {"A": a})[0]
    model = bench.dynamic_int8_matmul(w, fused=False)
    assert {n.op_type for n in onnx.load_from_string(model).graph.node} >= {
        "DynamicQuantizeLinear", "MatMulInteger"}
    unfused = serq_onnx.session(model).run(None, {"A": a})[0]
    np.testing.assert_allclose(unfused, fused, rtol=1e-4, atol=1e-4)
    assert _rel_rms(fused, a @ w) < 0.03


def test_nodes_for_bounds():
    f = bench.nodes_for
    assert f(100, 1, 576, 192) == bench.MAX_NODES  # small weights: capped
    assert f(4 * bench.MIB, 1, 1024, 1024) == 16  # 64 MiB of copies
    assert f(64 * bench.MIB, 1, 4096, 4096) == bench.MIN_NODES
    assert f(224 * bench.MIB, 1, 14336, 4096, memory_mib=1024) == 4  # memory budget
    assert f(28 * bench.MIB, 512, 4096, 14336) == 2  # large M: bounded work, >= 2 nodes
    assert f(10 * bench.MIB, 1, 4096, 4096, nodes=5) == 5
    assert f(10 * bench.MIB, 1, 4096, 4096, nodes=500, memory_mib=100) == 10
    assert f(2000 * bench.MIB, 1, 4096, 4096, memory_mib=1024) == 1


def test_time_session_counts_runs():
    class Fake:
        calls = 0

        def run(self, *_):
            Fake.calls += 1

    median, runs = bench.time_session(Fake(), {}, 0.001)
    assert median >= 0 and runs >= 5 and Fake.calls == runs + 3


def _fake_results():
    rng = np.random.default_rng(0)
    out = []
    for case in ("64x32", "32x16"):
        for m in (1, 8):
            k, n = map(int, case.split("x"))
            ms = {kern: float(rng.uniform(0.01, 1)) for kern in bench.KERNELS}
            out.append(bench.Timing(case, k, n, m, ms, nodes={kern: 8 for kern in ms},
                                    runs={kern: 5 for kern in ms},
                                    session_ms={kern: v * 8 for kern, v in ms.items()},
                                    weight_bytes={kern: 100 for kern in ms}))
    return out


def test_bench_run_times_every_kernel_per_node(tmp_path):
    results = bench.run([(128, 64)], [1, 4], min_seconds=0.01, progress=False, nodes=3)
    assert [(r.K, r.N, r.M) for r in results] == [(128, 64, 1), (128, 64, 4)]
    for r in results:
        assert set(r.ms) == set(bench.KERNELS)
        assert all(v > 0 for v in r.ms.values())
        assert r.nodes == {k: 3 for k in bench.KERNELS}
        for k in bench.KERNELS:
            assert r.ms[k] == pytest.approx(r.session_ms[k] / 3)
    table = bench.format_table(results)
    assert "fp32/w4a8" in table and "i8/w4a4" in table and "128x64" in table
    for k in bench.KERNELS:
        assert bench.SHORT[k] in table and k in table
    md = bench.format_markdown(results, machine="m", threads=2)
    for k in bench.KERNELS:
        assert f"| {k} |" in md or f" {k} |" in md
    assert "| 128x64 | 4 | 3 |" in md and "intra-op threads: 2" in md
    bench.write_json(tmp_path / "b.json", results, threads=0)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["kernels"] == list(bench.KERNELS) and len(data["results"]) == 2
    assert set(data["results"][0]["ms"]) == set(bench.KERNELS)
    assert "fp32/w4a8" in data["results"][0]["ratios"]
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # no temporary left


def test_ratios_use_the_fastest_nbits():
    r = _fake_results()[0]
    best = min(r.ms[k] for k in bench.NBITS)
    got = bench.ratios(r)
    assert got["NB/w4a8"] == pytest.approx(best / r.ms["SerqMatMul w4a8"])
    assert got["fp32/w4a4"] == pytest.approx(r.ms["float MatMul"] / r.ms["SerqMatMul w4a4"])
    assert got["i8/w4a8"] == pytest.approx(r.ms["dynamic int8"] / r.ms["SerqMatMul w4a8"])
    assert len(got) == 6


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: --plot not tested")
    path = tmp_path / "speedup.png"
    bench.write_plot(path, _fake_results(), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["speedup.png"]


def test_cli_defaults_match_bench():
    assert cli.bench_defaults() == {"ms": bench.DEFAULT_MS, "memory_mib": bench.DEFAULT_MEMORY_MIB}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    parser = sub.choices["bench"]
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.dest


def _cli(*args, cwd=None):
    # Outside the source tree, so that the installed package (with its op library) is used.
    return subprocess.run([sys.executable, "-m", "serq_onnx.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd or tempfile.gettempdir())


def test_cli_bench_end_to_end(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    args = ["bench", "-q", "--shape", "64x32", "--m", "1,2", "--seconds", "0.001", "--nodes", "2",
            "--json", str(js)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(png)]
    except ImportError:
        png = None
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "machine:" in proc.stdout and "intra-op threads: 0" in proc.stdout
    assert "fp32/w4a8" in proc.stdout and "64x32" in proc.stdout
    data = json.loads(js.read_text())
    assert [r["M"] for r in data["results"]] == [1, 2]
    assert data["settings"]["shapes"] == [[64, 32]]
    if png is not None:
        assert png.read_bytes()[:4] == b"\x89PNG"
    md = _cli("bench", "-q", "--shape", "64x32", "--m", "1", "--seconds", "0.001", "--nodes", "1",
              "--markdown")
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("Machine: ") and "| 64x32 | 1 | 1 |" in md.stdout


@pytest.mark.parametrize("flags,words", [
    (["--suite", "gpt9"], ("--suite", "smollm2")),
    (["--nodes", "-1"], ("--nodes",)),
    (["--memory-mib", "0"], ("--memory-mib",)),
    (["--json", "/nonexistent-dir/x.json"], ("--json", "does not exist")),
    (["--plot", "out.jpg"], ("--plot", ".png")),
])
def test_bench_new_option_errors(flags, words, tmp_path):
    proc = _cli("bench", "-q", "--shape", "64x32", "--m", "1", *flags, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serq-onnx: error:"), proc.stderr
    for w in words:
        assert w in lines[0]
    assert not proc.stdout and not list(tmp_path.iterdir())


def test_suites():
    assert bench.SUITES["llama3-8b"] == [(4096, 4096), (4096, 1024), (4096, 14336),
                                         (14336, 4096)]
    assert bench.SUITES["all"] == bench.SMOLLM2_SHAPES + bench.LLAMA3_8B_SHAPES
    assert bench.DEFAULT_MS == [1, 8, 128, 512]
