"""``serq-onnx inspect`` / ``convert --dry-run`` against real conversions, and ``--json``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serq_onnx.cli import main

# The size estimate counts initializers exactly from the op's formats (within 100 bytes on the
# tiny Llama); what it approximates is the graph's own bytes (nodes, names), from the export's
# bytes per node and a measured size per SerqMatMul. Measured on the tiny Llama, where the graph
# is 6-11% of the file: -0.8% to -1.6% over serq, rtn, l2qer and smoothquant at ranks 16 and
# 128; on real models the graph is a far smaller share of the bytes.
SIZE_TOLERANCE = 0.03


@pytest.mark.parametrize("method,fixture", [("serq", "tiny_llama"), ("rtn", "tiny_llama"),
                                            ("l2qer", "tiny_llama"),
                                            ("smoothquant", "tiny_llama"),
                                            ("serq", "tiny_llama_fp16")])
def test_inspect_agrees_with_a_real_conversion(request, tmp_path, method, fixture):
    from serq_onnx.converter import convert
    from serq_onnx.inspect import inspect_model

    tiny_llama = request.getfixturevalue(fixture)

    kw = dict(method=method, rank=16, group_w=32, calib_samples=2, calib_seqlen=32)
    seen = inspect_model(tiny_llama.onnx_path, log=lambda *a: None, **kw)
    report = convert(tiny_llama.onnx_path, tmp_path / "out", verify=False, progress=False,
                     log=lambda *a: None, **kw)
    assert seen.config == report.config
    assert len(seen.layers) == report.layers_converted
    assert seen.layers_by_role == report.layers_by_role
    assert seen.folds == report.folds
    assert seen.runtime_transforms == report.runtime_transforms
    assert seen.ranks == report.ranks
    assert seen.calib_tokens == report.calib_tokens
    assert seen.bytes_before == report.bytes_before
    assert abs(seen.bytes_after / report.bytes_after - 1) < SIZE_TOLERANCE, (
        seen.bytes_after, report.bytes_after)
    assert report.attention.startswith("GroupQueryAttention in 2 layers")
    assert seen.attention.startswith("would be GroupQueryAttention in 2 layers")
    # the passes listed are the ones the conversion timed
    stages = {p["name"] for p in seen.passes}
    assert ("gptq" in stages) == ("gptq" in report.timings)
    assert ("calibrate" in stages) == ("calibration" in report.timings)


def test_inspect_layer_table(tiny_llama):
    from serq_onnx.inspect import inspect_model

    seen = inspect_model(tiny_llama.onnx_path, rank=16, log=lambda *a: None)
    by_name = {d["name"]: d for d in seen.layers}
    cfg = tiny_llama.config
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    down = by_name["layers.0.mlp.down_proj"]
    assert (down["K"], down["N"], down["rank"], down["bits_w"]) == (inter, hidden, 16, 4)
    head = by_name["lm_head"]
    assert (head["K"], head["N"], head["rank"], head["bits_w"], head["bits_a"]) == (
        hidden, cfg["vocab_size"], 0, 8, 8)
    kinds = {g["name"]: (g["kind"], g["folded"]) for g in seen.groups}
    assert kinds["layers.0.mlp.down_proj.input"] == ("mlp_act", ["scale->up", "perm->gate,up"])
    assert kinds["layers.0.self_attn.q_proj.input"] == ("norm", ["scale->gamma"])
    text = seen.summary()
    assert "layers.0.mlp.down_proj" in text and "estimated time" in text
    assert "requires:" in text and "GPTQPass" in text


def test_estimate_reproduces_its_reference_conversion():
    """On SmolLM2-135M's shapes the time model returns the measured seconds it was fitted to:
    stages within 1% (the LM head's FLOPs are the only approximation), totals within 1.5% (one
    'other' figure serves both runs, 14.0 and 12.9 s measured)."""
    from serq_onnx import inspect as insp
    from serq_onnx.plan import InputGroup, Plan, Target

    hidden, inter, kv = 576, 1536, 192
    groups = []
    for layer in range(30):
        def t(role, K, N):
            return Target(node=None, name=f"layers.{layer}.{role}", role=role, layer=layer,
                          K=K, N=N)
        groups += [InputGroup(None, "norm", [t("q", hidden, hidden), t("k", hidden, kv),
                                             t("v", hidden, kv)]),
                   InputGroup(None, "runtime", [t("o", hidden, hidden)]),
                   InputGroup(None, "norm", [t("gate", hidden, inter), t("up", hidden, inter)]),
                   InputGroup(None, "mlp_act", [t("down", inter, hidden)])]
    from serq_onnx.plan import ConvertConfig

    plan = Plan(ConvertConfig(lm_head="float"), groups)
    ref = insp.REFERENCE
    secs, peak = insp.estimate(plan, ref["tokens"], 512, ref["model_bytes"], 49152)
    assert secs["calibration"] == pytest.approx(ref["calib_s"] + ref["gram_s"], rel=0.01)
    assert secs["gptq"] == pytest.approx(ref["gptq_s"], rel=0.01)
    assert secs["total"] == pytest.approx(96.0, rel=0.015)  # the measured totals
    plan.config = ConvertConfig(lm_head="float", weight_quant="rtn")
    secs, _ = insp.estimate(plan, ref["tokens"], 512, ref["model_bytes"], 49152)
    assert secs["calibration"] == pytest.approx(ref["calib_s"], rel=0.01)
    assert secs["quantization"] == pytest.approx(ref["rtn_mse_s"], rel=0.01)
    assert secs["total"] == pytest.approx(61.5, rel=0.015)
    # memory: round to nearest peaks in the float stages (a session's copy beside the model);
    # GPTQ's sweep holds the Gram sums, one sequence's set and onnxruntime's buffers per entry
    # beside less of the model, and the peak is the larger stage
    _, peak_rtn = insp.estimate(plan, ref["tokens"], 512, ref["model_bytes"], 49152)
    logits, m = 512 * 49152 * 4, ref["model_bytes"]
    assert peak_rtn == int(insp.BASE_RSS + insp.MODEL_COPIES * m + logits)
    def grams(entries: int) -> int:  # summing them, or solving the widest group beside them
        widest = max(g.K for g in plan.groups)
        return max(insp.GRAM_PEAK_BYTES_PER_ENTRY * entries,
                   insp.GRAM_BYTES_HELD * entries + insp.GPTQ_SOLVE_BYTES * widest ** 2)

    sweep = (insp.GPTQ_STAGE_COPIES + 1) * m + grams(sum(g.K ** 2 for g in plan.groups))
    assert peak == max(peak_rtn, int(insp.BASE_RSS + sweep + logits))
    # external data: the stages' copies measured on the 0.47B and 1.47B Llamas
    assert insp.peak_bytes(m, True, 0, 0) == int(insp.BASE_RSS + insp.MODEL_COPIES_EXTERNAL * m)
    assert insp.peak_bytes(m, True, 0, 0, low_memory=True) < insp.peak_bytes(m, True, 0, 0)
    # chunked, the sweep holds the largest chunk's Gram matrices (no model: the sweep is the peak)
    plan.config = ConvertConfig(lm_head="float", gram_memory_mib=1)
    chunks = plan.gram_chunks()
    assert len(chunks) > 1
    _, peak_chunked = insp.estimate(plan, ref["tokens"], 512, 0, 49152)
    largest = max(sum(plan.groups[i].K ** 2 for i in c) for c in chunks)
    assert peak_chunked == int(insp.BASE_RSS + grams(largest) + logits)
    big = 10 ** 9  # Gram entries enough for the sweep to be the peak
    assert insp.peak_bytes(m, True, big, 0) - insp.peak_bytes(m, True, big // 2, 0) == (
        insp.GRAM_PEAK_BYTES_PER_ENTRY * big // 2)
    # a wide layer's solve (float64 K x K arrays) outweighs summing a chunk of narrow ones
    wide = insp.peak_bytes(0, True, 10 ** 6, 0, widest_k=14336)
    assert wide == int(insp.BASE_RSS + insp.GRAM_BYTES_HELD * 10 ** 6
                       + insp.GPTQ_SOLVE_BYTES * 14336 ** 2)
    assert wide > insp.peak_bytes(0, True, 10 ** 6, 0)


def test_dry_run_writes_nothing_and_checks_the_output(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama.onnx_path), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing written" in text and "passes:" in text
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_llama.onnx_path), "-o", str(out), "--dry-run"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _json_out(capsys) -> dict:
    captured = capsys.readouterr()
    return json.loads(captured.out)  # exactly one JSON object: json.loads refuses more


def test_every_command_prints_one_json_object(tiny_llama, tmp_path, capsys):
    model = str(tiny_llama.onnx_path)
    assert main(["inspect", model, "--json"]) == 0
    data = _json_out(capsys)
    assert data["layers"] and data["passes"] and data["bytes_after"] > 0

    assert main(["convert", model, "-o", str(tmp_path / "dry"), "--dry-run", "--json"]) == 0
    data = _json_out(capsys)
    assert data["dry_run"] is True and not (tmp_path / "dry").exists()

    out = tmp_path / "conv"
    assert main(["convert", model, "-o", str(out), "--json", "-q", "--calib-samples", "2",
                 "--calib-seqlen", "16", "--no-verify"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["layers_converted"] == 15 and data["output"] == str(out / "model.onnx")
    assert "random tokens" in captured.err  # the warning went to stderr

    assert main(["nbits", model, "-o", str(tmp_path / "nb"), "--json", "-q"]) == 0
    data = _json_out(capsys)
    assert data["config"]["layers_quantized"] == 14

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 10)
    assert main(["eval", str(out), "--text", str(text), "--ctx", "32", "--last-word", "0",
                 "-q", "--json"]) == 0
    data = _json_out(capsys)
    assert np.isfinite(data["perplexity"]["ppl"])

    assert main(["bench", "--shape", "64x64", "--m", "1", "--seconds", "0.01", "--nodes", "1",
                 "-q", "--json"]) == 0
    data = _json_out(capsys)
    assert data["results"] and data["settings"]["shapes"] == [[64, 64]]


def test_json_errors_are_one_object_and_a_stderr_line(tiny_llama, tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / "missing.onnx"), "--json"])
    captured = capsys.readouterr()
    assert rc == 2
    assert json.loads(captured.out) == {
        "error": f"model file not found: {tmp_path / 'missing.onnx'}", "exit_code": 2}
    err = f"serq-onnx: error: model file not found: {tmp_path / 'missing.onnx'}"
    assert captured.err.strip() == err

    rc = main(["convert", str(tiny_llama.onnx_path), "-o", str(tmp_path / "o"), "--json",
               "--rank", "-1"])
    captured = capsys.readouterr()
    assert rc == 2 and "--rank must be >= 0" in json.loads(captured.out)["error"]

    with pytest.raises(SystemExit) as exc:  # a usage error, before any command runs
        main(["inspect", "--json"])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    err = json.loads(captured.out)
    assert err["exit_code"] == 2 and "required: model" in err["error"]
    assert "usage:" in captured.err

    # without --json: no JSON on stdout
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().out == ""
