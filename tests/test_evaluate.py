"""The evaluation harness against direct PyTorch computations on the same tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serq_onnx.errors import SerqError
from serq_onnx.evaluate import decode_speed, perplexity, tokenize_text

# Both sides run the same float32 model; kernel differences move each logit by ~1e-6 relative,
# and ppl = exp(mean nll) inherits that. 1e-4 leaves a wide margin yet stays far below what a
# wrong window, target shift or position would cause (test_tolerance_detects_off_by_one).
PPL_RTOL = 1e-4


def _torch_model(model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    return torch, AutoModelForCausalLM.from_pretrained(model.hf_dir, dtype=torch.float32).eval()


def _torch_ppl(model, ids: np.ndarray, ctx: int, shift: int = 1) -> tuple[float, int, int]:
    """Perplexity by HF forward + float64 cross-entropy; ``shift`` 2 is a deliberate bug."""
    torch, hf = _torch_model(model)
    nll, n_pred, n_windows = 0.0, 0, 0
    for start in range(0, len(ids), ctx):
        w = torch.from_numpy(ids[start:start + ctx])
        if len(w) < 2:
            continue
        with torch.no_grad():
            logits = hf(w[None]).logits[0].double()
        n = len(w) - shift
        nll += torch.nn.functional.cross_entropy(logits[:n], w[shift:], reduction="sum").item()
        n_pred += n
        n_windows += 1
    return math.exp(nll / n_pred), n_pred, n_windows


def _random_ids(model, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.config["vocab_size"], n, dtype=np.int64)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_odd"])
@pytest.mark.parametrize("n_tokens", [3 * 64, 2 * 64 + 37, 2 * 64 + 1])
def test_perplexity_matches_torch(request, fixture, n_tokens):
    model = request.getfixturevalue(fixture)
    ctx = 64
    ids = _random_ids(model, n_tokens)
    result = perplexity(model.onnx_path, ids, ctx=ctx, progress=False)
    ref_ppl, ref_pred, ref_windows = _torch_ppl(model, ids, ctx)

    full, rest = divmod(n_tokens, ctx)
    assert result.n_windows == ref_windows == full + (rest >= 2)
    assert result.n_predicted == ref_pred == full * (ctx - 1) + max(rest - 1, 0)
    assert result.ppl == pytest.approx(ref_ppl, rel=PPL_RTOL)
    assert result.nll_sum == pytest.approx(math.log(ref_ppl) * ref_pred, rel=PPL_RTOL)
    assert result.seconds > 0 and result.tokens_per_s > 0


def test_tolerance_detects_off_by_one(tiny_llama):
    ids = _random_ids(tiny_llama, 3 * 64)
    right, _, _ = _torch_ppl(tiny_llama, ids, 64)
    shifted, _, _ = _torch_ppl(tiny_llama, ids, 64, shift=2)
    assert abs(shifted / right - 1) > 10 * PPL_RTOL


def test_perplexity_max_tokens_and_session_forms(tiny_llama):
    import onnxruntime as ort

    ids = _random_ids(tiny_llama, 200, seed=1)
    sess = ort.InferenceSession(str(tiny_llama.onnx_path), providers=["CPUExecutionProvider"])
    truncated = perplexity(sess, ids, ctx=64, max_tokens=150, progress=False)
    assert (truncated.n_windows, truncated.n_predicted) == (3, 2 * 63 + 21)
    by_factory = perplexity(lambda: sess, ids[:150], ctx=64, progress=False)
    assert by_factory.nll_sum == truncated.nll_sum  # same session, same windows
    by_path = perplexity(tiny_llama.onnx_path, ids[:150], ctx=64, progress=False)
    assert by_path.ppl == pytest.approx(truncated.ppl, rel=1e-12)
    with pytest.raises(SerqError):
        perplexity(sess, ids[:1], ctx=64, progress=False)


def test_greedy_decode_matches_hf_generate(tiny_llama_odd):
    torch, hf = _torch_model(tiny_llama_odd)
    from transformers import GenerationConfig

    prompt = _random_ids(tiny_llama_odd, 12, seed=2)
    new = 16
    stats = decode_speed(tiny_llama_odd.onnx_path, prompt, new_tokens=new)
    hf.generation_config.eos_token_id = None  # the harness does not stop at EOS; neither may HF
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt)[None],
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          generation_config=config)
    expected = out[0, len(prompt):].tolist()
    assert len(expected) == new
    assert stats["tokens"] == expected


def test_decode_speed_reports_sane_numbers(tiny_llama):
    prompt = _random_ids(tiny_llama, 20, seed=3)
    stats = decode_speed(tiny_llama.onnx_path, prompt, new_tokens=8)
    assert stats["prompt_tokens"] == 20 and stats["new_tokens"] == 8
    assert len(stats["tokens"]) == 8
    assert all(0 <= t < tiny_llama.config["vocab_size"] for t in stats["tokens"])
    for key in ("prefill_seconds", "decode_seconds"):
        assert 0 < stats[key] < 60
    assert stats["prefill_tokens_per_s"] == pytest.approx(20 / stats["prefill_seconds"])
    assert stats["decode_tokens_per_s"] == pytest.approx(7 / stats["decode_seconds"])
    with pytest.raises(SerqError):
        decode_speed(tiny_llama.onnx_path, prompt, new_tokens=1)


def test_tokenize_text_is_running_text(tiny_llama, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    text = "It is a truth universally acknowledged,\nthat a single man — café — wants a wife."
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    ids = tokenize_text(tiny_llama.hf_dir, path)
    tok = AutoTokenizer.from_pretrained(tiny_llama.hf_dir)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert tok.bos_token_id not in ids.tolist()
    assert tok.decode(ids.tolist()) == text
    np.testing.assert_array_equal(tokenize_text(tiny_llama.hf_dir, path, max_tokens=5), ids[:5])
    with pytest.raises(SerqError):
        tokenize_text(tiny_llama.hf_dir, tmp_path / "missing.txt")


def _onnx_model(tmp_path, inputs, outputs):
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0][0]], [outputs[0][0]])], "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("case", ["no_input_ids", "unknown_input", "float_ids"])
def test_rejects_models_that_are_not_causal_lm_exports(tmp_path, case):
    from onnx import TensorProto as T

    ids = ("input_ids", T.INT64, ["b", "s"])
    mask = ("attention_mask", T.INT64, ["b", "s"])
    inputs = {"no_input_ids": [("x", T.FLOAT, ["b", "s"]), mask],
              "unknown_input": [ids, mask, ("pixel_values", T.FLOAT, ["b", "s"])],
              "float_ids": [("input_ids", T.FLOAT, ["b", "s"]), mask]}[case]
    path = _onnx_model(tmp_path, inputs, [("logits", inputs[0][1], ["b", "s"])])
    with pytest.raises(SerqError):
        perplexity(path, np.arange(10), ctx=4, progress=False)


def test_rejects_past_without_present(tmp_path):
    from onnx import TensorProto as T

    path = _onnx_model(tmp_path, [("input_ids", T.INT64, ["b", "s"]),
                                  ("attention_mask", T.INT64, ["b", "t"]),
                                  ("past_key_values.0.key", T.FLOAT, ["b", 2, "p", 8]),
                                  ("past_key_values.0.value", T.FLOAT, ["b", 2, "p", 8])],
                       [("logits", T.INT64, ["b", "s"])])
    with pytest.raises(SerqError, match="present.0.key"):
        decode_speed(path, np.arange(4), new_tokens=2)
