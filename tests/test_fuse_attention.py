"""FuseAttentionPass: each layer's attention of an Optimum export as one GroupQueryAttention.

The fused float graph is checked against the original on a left-padded batch (prefill and
decode), and the converted model with fused attention against the torch fake-quant (which has
no notion of fusion) in tests/test_convert.py.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from serq_onnx import SerqError, compare, verify
from serq_onnx.converter import convert
from serq_onnx.modelio import load_model
from serq_onnx.passes import FuseAttentionPass, RotaryParams
from serq_onnx.passes.fuse_attention import find_layers

SMALL = dict(rank=16, group_w=32, group_a=32, calib_samples=2, calib_seqlen=32, progress=False,
             log=lambda *a: None)


def _rotary(tiny) -> RotaryParams:
    return RotaryParams.from_config(tiny.config)


def _fused(tiny) -> tuple[ir.Model, FuseAttentionPass, int]:
    model = load_model(tiny.onnx_path)
    before = sum(1 for _ in model.graph)
    p = FuseAttentionPass(_rotary(tiny))
    assert p(model).modified, p.reason
    return model, p, before


def test_every_layer_becomes_one_group_query_attention(tiny_llama):
    model, p, before = _fused(tiny_llama)
    ops = Counter(n.op_type for n in model.graph)
    layers = tiny_llama.config["num_hidden_layers"]
    assert p.layers == layers and p.reason is None
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["Softmax"] == 0 and sum(ops.values()) < before / 2
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    attrs = {k: a.value for k, a in gqa.attributes.items()}
    c = tiny_llama.config
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (c["num_attention_heads"],
                                                            c["num_key_value_heads"])
    # The graph's interface is the export's: same inputs and outputs, present.* from the kernel.
    ref = load_model(tiny_llama.onnx_path)
    assert [v.name for v in model.graph.inputs] == [v.name for v in ref.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in ref.graph.outputs]
    assert all(o.producer().op_type == "GroupQueryAttention"
               for o in model.graph.outputs if o.name.startswith("present."))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_odd", "tiny_llama_fp16"])
def test_fused_graph_equals_the_export_on_a_left_padded_batch(fixture, request):
    """Prefill with padding on the left (as transformers batches) and greedy decode steps. The
    FP16 export computes its attention probabilities in float32 between Casts; the fused graph
    casts the kernel's output back where the output projection reads float32."""
    tiny = request.getfixturevalue(fixture)
    model, p, _ = _fused(tiny)
    dtype = "float16" if fixture.endswith("fp16") else "float32"
    check = verify.check_attention_fusion(tiny.onnx_path, model, tiny.config["vocab_size"],
                                          dtype, steps=3)
    assert check.tokens_equal and check.rel_max <= verify.ATTENTION_TOLERANCE[dtype], check


def test_fp16_export_converts_with_fused_attention(tiny_llama_fp16, tmp_path):
    report = convert(tiny_llama_fp16.onnx_path, tmp_path / "out", **SMALL)
    assert report.attention.startswith("GroupQueryAttention in 2 layers"), report.attention
    ops = Counter(n.op_type for n in load_model(tmp_path / "out" / "model.onnx").graph)
    assert ops["GroupQueryAttention"] == 2 and ops["SerqMatMul"] > 0


def test_a_wrong_fusion_is_caught(tiny_llama):
    """The check is not vacuous: a fused graph with the wrong rotary base fails it."""
    model = load_model(tiny_llama.onnx_path)
    r = _rotary(tiny_llama)
    FuseAttentionPass(RotaryParams(theta=r.theta * 3, head_dim=r.head_dim,
                                   max_positions=r.max_positions))(model)
    with pytest.raises(SerqError, match="fused attention changed the float model"):
        verify.check_attention_fusion(tiny_llama.onnx_path, model, tiny_llama.config["vocab_size"])


def test_convert_fuses_attention_by_default_and_reports_it(tiny_llama, tmp_path):
    report = convert(tiny_llama.onnx_path, tmp_path / "on", **SMALL)
    assert report.attention.startswith("GroupQueryAttention in 2 layers"), report.attention
    assert "greedy tokens equal" in report.attention
    saved = json.loads((tmp_path / "on" / "serq_config.json").read_text())
    assert saved["attention"] == report.attention
    off = convert(tiny_llama.onnx_path, tmp_path / "off", fuse_attention=False, **SMALL)
    assert off.attention == "as exported (--no-fuse-attention)"
    ops_on = Counter(n.op_type for n in load_model(tmp_path / "on" / "model.onnx").graph)
    ops_off = Counter(n.op_type for n in load_model(tmp_path / "off" / "model.onnx").graph)
    assert ops_on["GroupQueryAttention"] == 2 and ops_off["GroupQueryAttention"] == 0
    assert ops_on["SerqMatMul"] == ops_off["SerqMatMul"]
    # Both quantize the same function: their logits agree far better than either with float.
    ids = np.arange(3, 40, dtype=np.int64)
    import serq_onnx

    a = compare.logits(serq_onnx.session(tmp_path / "on" / "model.onnx"), ids)
    b = compare.logits(serq_onnx.session(tmp_path / "off" / "model.onnx"), ids)
    flt = compare.logits(compare.cpu_session(tiny_llama.onnx_path), ids)
    assert compare.diff(a, b).rel_rms < compare.diff(b, flt).rel_rms / 5


def test_graph_without_kv_cache_is_left_alone(tmp_path):
    """An export without past/present (text-generation, no cache): nothing to fuse, and why."""
    import onnx

    graph = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (int64[1, 4] input_ids, int64[1, 4] attention_mask, int64[1, 4] position_ids)
          => (float[1, 4, 8] logits) {
          f = Cast<to = 1>(input_ids)
          u = Unsqueeze(f, axes)
          logits = Expand(u, shape)
        }
    """)
    graph.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([2], np.int64), "axes"),
                                    onnx.numpy_helper.from_array(np.array([1, 4, 8], np.int64),
                                                                 "shape")])
    model = ir.serde.deserialize_model(graph)
    layers, reason = find_layers(model.graph)
    assert layers == [] and "no present.N.key outputs" in reason
    p = FuseAttentionPass(RotaryParams(10000.0, 8, 64))
    assert not p(model).modified and p.reason == reason


def test_missing_position_ids_is_named(tiny_llama):
    model = load_model(tiny_llama.onnx_path)
    pos = next(v for v in model.graph.inputs if v.name == "position_ids")
    pos.name = "positions"
    p = FuseAttentionPass(_rotary(tiny_llama))
    assert not p(model).modified and p.reason == "the graph has no 'position_ids' input"


def test_scaled_rope_is_refused_with_its_name():
    cfg = {"num_attention_heads": 4, "hidden_size": 64,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ValueError, match="llama3"):
        RotaryParams.from_config(cfg)
    assert RotaryParams.from_config({**cfg, "rope_scaling": None}).head_dim == 16


@pytest.mark.parametrize("extra,words", [
    ({"sliding_window": 4096}, "sliding-window attention (4096 tokens)"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar")])
def test_attention_the_kernel_cannot_express_is_refused(extra, words):
    """What a short numerical check would not catch (a window longer than the check) or what
    GroupQueryAttention computes differently is refused from the config, by name."""
    cfg = {"num_attention_heads": 4, "hidden_size": 64, **extra}
    with pytest.raises(ValueError) as err:
        RotaryParams.from_config(cfg)
    assert words in str(err.value)


def test_an_unused_sliding_window_is_no_reason_to_refuse():
    """Qwen2 configs carry a window they do not use."""
    cfg = {"num_attention_heads": 4, "hidden_size": 64, "sliding_window": 4096,
           "use_sliding_window": False}
    assert RotaryParams.from_config(cfg).head_dim == 16


def test_convert_keeps_attention_when_rope_is_scaled(tiny_llama, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama.onnx_path.parent, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (src / "config.json").write_text(json.dumps(cfg))
    report = convert(src / "model.onnx", tmp_path / "out", **SMALL)
    assert report.attention.startswith("as exported (config.json asks for rope_scaling ")
    assert "yarn" in report.attention


def test_graph_after_onnxruntime_transformer_optimizer_converts(tiny_llama, tmp_path):
    """onnxruntime's own fusions (gpt2 type: RotaryEmbedding, SkipSimplifiedLayerNormalization)
    come first here; the converter still folds into the fused norms and fuses the attention."""
    import shutil

    import onnx

    pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.optimizer import optimize_model

    src = tmp_path / "optimized"
    shutil.copytree(tiny_llama.onnx_path.parent, src)
    c = tiny_llama.config
    optimize_model(str(tiny_llama.onnx_path), model_type="gpt2", num_heads=c["num_attention_heads"],
                   hidden_size=c["hidden_size"], opt_level=0).save_model_to_file(
        str(src / "model.onnx"))
    ops = Counter(n.op_type for n in onnx.load(str(src / "model.onnx")).graph.node)
    assert ops["RotaryEmbedding"] == 2 * c["num_hidden_layers"]
    assert ops["SkipSimplifiedLayerNormalization"] > 0
    report = convert(src / "model.onnx", tmp_path / "out", **SMALL)
    assert report.attention.startswith("GroupQueryAttention in 2 layers"), report.attention
    assert report.folds.get("scale->gamma", 0) >= 2 * c["num_hidden_layers"]
    assert report.layers_converted == 7 * c["num_hidden_layers"] + 1


def test_fused_model_decodes_in_one_shared_cache_buffer(tiny_llama, tmp_path):
    """The fused model is marked as able to share past/present buffers; decoding that way
    (one preallocated buffer per cache tensor) gives at every step the logits of the plain
    numpy path, which passes a new cache each step."""
    from serq_onnx.evaluate import _Greedy, causal_lm_spec, decode_speed
    from serq_onnx.passes.fuse_attention import SHARE_BUFFER_KEY

    import serq_onnx

    convert(tiny_llama.onnx_path, tmp_path / "out", **SMALL)
    sess = serq_onnx.session(tmp_path / "out" / "model.onnx")
    assert sess.get_modelmeta().custom_metadata_map.get(SHARE_BUFFER_KEY) == "1"
    spec = causal_lm_spec(sess)
    prompt = np.arange(3, 20, dtype=np.int64)
    shared = _Greedy(sess, spec, max_length=len(prompt) + 8)
    plain = _Greedy(sess, spec, io_binding=False)
    assert shared.shared is not None and plain.shared is None
    (ta, pa), (tb, pb) = shared.prefill(prompt), plain.prefill(prompt)
    rng = np.random.default_rng(0)
    for pos in range(len(prompt), len(prompt) + 7):
        np.testing.assert_allclose(shared.logits, plain.logits, rtol=0, atol=1e-5)
        token = int(rng.integers(3, tiny_llama.config["vocab_size"]))  # not the degenerate argmax
        (ta, pa), (tb, pb) = shared.step(token, pos, pa), plain.step(token, pos, pb)
    np.testing.assert_allclose(shared.logits, plain.logits, rtol=0, atol=1e-5)
    with pytest.raises(SerqError, match="outgrew"):
        shared.step(3, len(prompt) + 8, pa)
    # The export itself is not marked: its cache goes through Concat, so it keeps fresh buffers.
    float_sess = compare.cpu_session(tiny_llama.onnx_path)
    assert _Greedy(float_sess, causal_lm_spec(float_sess), max_length=64).shared is None
    a = decode_speed(sess, prompt, new_tokens=6, warmup=True)["tokens"]
    b = decode_speed(sess, prompt, new_tokens=6, warmup=False, io_binding=False)["tokens"]
    assert a == b
