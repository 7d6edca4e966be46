"""The evaluation harness against direct PyTorch computations on the same tiny models."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

from serq_onnx.errors import SerqError
from serq_onnx.evaluate import (STOP_WORDS, LastWordPassage, decode_speed, last_word_accuracy,
                                last_word_passages, perplexity, tokenize_text)

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


# ---- last-word accuracy ------------------------------------------------------------------------

_CHAPTER = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.\n\n"
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park '
    'is let at last?"\n\n'
    "Mr. Bennet replied that he had not.\n\n"  # stop word
    '"But it is," returned she; "for Mrs. Long has just been here, and she told me all about '
    'it."\n\n'  # Mrs. is an abbreviation; "it" is too short
    "Mr. Bennet made no answer.\n\n"
    '"Bingley."\n\n'  # no space before the word
    "Is he married or single? Oh! Single, my dear, to be sure! What a fine thing for our "
    "girls! She went on, etc. and so on.\n\n"
)
# A heading long enough that every candidate has the context tests ask for.
LW_TEXT = "PRIDE AND PREJUDICE: a heading with no sentence end\n\n" + "".join(
    f"Chapter {i}\n\n{_CHAPTER}" for i in range(1, 4))
LW_CONTEXT = 8


def _expected_last_words(text: str) -> list[tuple[int, str]]:
    """Sentence-final words by a whitespace split, independent of the module's regex."""
    out = []
    for m in re.finditer(r"\S+", text):
        core = m.group().rstrip("\"')]_\u201d\u2019")
        word = core[:-1]
        if (m.start() > 0 and text[m.start() - 1] == " " and core[-1:] in (".", "!", "?")
                and len(word) >= 3 and word.isascii() and word.isalpha()
                and word.lower() not in STOP_WORDS):
            out.append((m.start(), word))
    return out


@pytest.fixture
def lw_text(tmp_path):
    path = tmp_path / "chapters.txt"
    path.write_text(LW_TEXT, encoding="utf-8")
    return path


def test_last_word_passages_invariants(tiny_llama, lw_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama.hf_dir)
    expected = _expected_last_words(LW_TEXT)
    assert [w for _, w in expected[:7]] == ["wife", "daughters", "last", "answer", "single",
                                            "sure", "girls"]
    every = last_word_passages(tiny_llama.hf_dir, lw_text, n=len(expected),
                               context_tokens=LW_CONTEXT)
    assert [(p.offset, p.word) for p in every] == expected
    for p in every:
        assert LW_TEXT[p.offset - 1] == " " and LW_TEXT[p.offset + len(p.word)] in ".!?"
        assert len(p.context) == LW_CONTEXT and len(p.target) >= 1
        assert tok.decode(list(p.target)) == " " + p.word
        context_text = tok.decode(list(p.context))
        assert LW_TEXT[:p.offset - 1].endswith(context_text)
        joint = tok(context_text + " " + p.word, add_special_tokens=False)["input_ids"]
        assert joint == list(p.context + p.target)

    # n passages: the first candidate of each of n equal slices, the same on every call.
    three = last_word_passages(tiny_llama.hf_dir, lw_text, n=3, context_tokens=LW_CONTEXT)
    assert three == last_word_passages(tiny_llama.hf_dir, lw_text, n=3,
                                       context_tokens=LW_CONTEXT)
    assert [p.offset for p in three] == [expected[k * len(expected) // 3][0] for k in range(3)]
    with pytest.raises(SerqError, match="fewer than"):
        last_word_passages(tiny_llama.hf_dir, lw_text, n=len(expected) + 1,
                           context_tokens=LW_CONTEXT)


class _OracleSession:
    """Looks like an Optimum export without a KV cache; predicts ``truth[t + 1]`` at row ``t``
    except at the rows in ``wrong``, and records what it was fed."""

    vocab = 50

    def __init__(self, truth, wrong=()):
        self.truth, self.wrong, self.fed = list(truth), set(wrong), []

    def get_inputs(self):
        return [SimpleNamespace(name=n, type="tensor(int64)", shape=["b", "s"])
                for n in ("input_ids", "attention_mask")]

    def get_outputs(self):
        return [SimpleNamespace(name="logits")]

    def run(self, names, feed):
        ids = feed["input_ids"][0]
        self.fed.append(ids.tolist())
        logits = np.zeros((1, len(ids), self.vocab), np.float32)
        for t in range(len(ids)):
            nxt = self.truth[t + 1]
            logits[0, t, (nxt + 1) % self.vocab if t in self.wrong else nxt] = 10.0
        return [logits]


@pytest.mark.parametrize("wrong, correct", [((), True), ((1,), True), ((4,), False),
                                            ((6,), False), ((5,), False)])
def test_last_word_rule_is_every_target_token(wrong, correct):
    # context 5 tokens, target 3: rows 4, 5 and 6 predict the target; rows 0..3 the context.
    p = LastWordPassage(context=(1, 2, 3, 4, 5), target=(6, 7, 8), word="abc", offset=0)
    sess = _OracleSession(p.context + p.target, wrong)
    r = last_word_accuracy(sess, [p], progress=False)
    assert sess.fed == [[1, 2, 3, 4, 5, 6, 7]]  # the last target token is never an input
    assert r.correct == (correct,) and r.accuracy == float(correct) and r.n == 1
    expected = [(t + 1) % 50 if i + 4 in wrong else t for i, t in enumerate(p.target)]
    assert r.predicted == (tuple(expected),)


def test_last_word_accuracy_matches_torch(tiny_llama, lw_text):
    torch, hf = _torch_model(tiny_llama)
    passages = last_word_passages(tiny_llama.hf_dir, lw_text, n=6, context_tokens=24)

    def forward(ids):
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].double()

    # Two passages the random model must get right and wrong: its own greedy continuation, and
    # the same with the last token changed.
    ctx = passages[0].context
    greedy = []
    for _ in range(3):
        greedy.append(int(forward(list(ctx) + greedy)[-1].argmax()))
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % tiny_llama.config["vocab_size"]]
    passages += [LastWordPassage(ctx, tuple(greedy), "own", -1),
                 LastWordPassage(ctx, tuple(wrong_last), "not", -1)]

    result = last_word_accuracy(tiny_llama.onnx_path, passages, progress=False)
    nll, correct = 0.0, []
    for p, pred in zip(passages, result.predicted):
        rows = forward(list(p.context + p.target))[len(p.context) - 1:-1]
        target = torch.tensor(p.target)
        ref = rows.argmax(-1)
        for j in np.flatnonzero(ref.numpy() != np.array(pred)):  # only near-ties may differ
            assert rows[j, ref[j]] - rows[j, pred[j]] < 1e-4
        correct.append(bool((ref == target).all()))
        nll += torch.nn.functional.cross_entropy(rows, target, reduction="sum").item()
    assert result.correct == tuple(correct)
    assert correct[-2:] == [True, False]
    assert result.n == len(passages) and result.accuracy == sum(correct) / len(passages)
    assert result.target_nll == pytest.approx(nll / len(passages), rel=PPL_RTOL)
    assert result.seconds > 0


# ---- onnxruntime's MatMulNBits baseline ---------------------------------------------------------

def _dequantize(model, node):
    """The float weight [K, N] a symmetric MatMulNBits node multiplies by, and its scales."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    K, N, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, block / 2]
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(N, -1)
    q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(N, -1, block).astype(np.float32)
    w = ((q - 8) * scales[:, :, None]).reshape(N, -1)[:, :K].T
    return w, np.repeat(scales, block, axis=1)[:, :K].T, q


def _logits(path, ids):
    import onnxruntime as ort

    from serq_onnx.evaluate import prefill_feed, causal_lm_spec

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], prefill_feed(causal_lm_spec(sess), ids))[0][0]


def test_matmulnbits_baseline(tiny_llama, tmp_path):
    import onnx
    from onnx import numpy_helper

    from serq_onnx.nbits_baseline import make_matmulnbits_model

    out = make_matmulnbits_model(tiny_llama.onnx_path, tmp_path / "nbits", progress=False)
    assert out == tmp_path / "nbits" / "model.onnx"
    for name in ("tokenizer.json", "config.json", "nbits_config.json"):
        assert (out.parent / name).is_file()
    assert json.loads((out.parent / "nbits_config.json").read_text())["layers_quantized"] == 14

    qmodel, fmodel = onnx.load(out), onnx.load(tiny_llama.onnx_path)
    nbits = [n for n in qmodel.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 == 7 * tiny_llama.config["num_hidden_layers"]
    (head,) = [n for n in qmodel.graph.node if "logits" in n.output]
    q_inits = {i.name for i in qmodel.graph.initializer}
    assert head.op_type == "MatMul" and head.input[1] in q_inits  # lm_head stays float

    # Each MatMulNBits is round-to-nearest on a 16-level grid of the float weight; the float
    # graph with those dequantized weights is the exact reference for the quantized one.
    f_inits = {i.name: i for i in fmodel.graph.initializer}
    f_nodes = {n.name: n for n in fmodel.graph.node}
    num = den = 0.0
    for node in nbits:
        assert {a.name: a.i for a in node.attribute}["bits"] == 4
        orig = f_nodes[node.name.removesuffix("_Q4")]
        w = numpy_helper.to_array(f_inits[orig.input[1]])
        w_hat, scale, q = _dequantize(qmodel, node)
        assert w_hat.shape == w.shape and q.min() >= 0 and q.max() <= 15
        # Levels -8..7 with the largest magnitude of a block at -8: half a step from the grid,
        # except values clamped at +7 (the other side's extreme), which may be a whole step off.
        step = np.abs(w - w_hat) / np.abs(scale)
        clamped = (q.reshape(q.shape[0], -1)[:, :w.shape[0]].T == 15)
        assert step[~clamped].max() <= 0.5 + 1e-4 and step[clamped].max() <= 1 + 1e-4
        num, den = num + ((w - w_hat) ** 2).sum(), den + (w ** 2).sum()
        f_inits[orig.input[1]].CopyFrom(numpy_helper.from_array(w_hat.astype(np.float32),
                                                                orig.input[1]))
    weight_err = math.sqrt(num / den)
    deq_path = tmp_path / "dequantized.onnx"
    onnx.save(fmodel, deq_path)

    ids = _random_ids(tiny_llama, 48, seed=4)
    got, ref = _logits(out, ids), _logits(deq_path, ids)
    float_logits = _logits(tiny_llama.onnx_path, ids)
    # Unset accuracy_level dequantizes to float32 and multiplies as MatMul does (bit-identical
    # here); 1e-4 leaves room for another summation order.
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # Against float: 4-bit RTN of Gaussian weights leaves a relative weight error near 0.1.
    # Each linear's output error is then about as large relative to its output (the error is
    # uncorrelated with the input), and through two residual blocks the relative logit error
    # stays of that order (0.086-0.094 over five inputs for a weight error of 0.096). A factor
    # 2 either way absorbs the input; transposed or misplaced weights give errors near 1.
    logit_err = np.linalg.norm(got - float_logits) / np.linalg.norm(float_logits)
    assert 0.05 < weight_err < 0.15
    assert weight_err / 2 < logit_err < 2 * weight_err


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_eval_writes_json(tiny_llama, lw_text, tmp_path, capsys):
    from serq_onnx.cli import main

    out = tmp_path / "eval.json"
    args = ["eval", str(tiny_llama.onnx_path.parent), "--text", str(lw_text), "--ctx", "64",
            "--max-tokens", "200", "--last-word-context", str(LW_CONTEXT), "-q"]
    assert main([*args, "--last-word", "4", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "perplexity" in lines[0] and "last-word accuracy" in lines[1]
    data = json.loads(out.read_text())
    ids = tokenize_text(tiny_llama.hf_dir, lw_text, max_tokens=200)
    direct = perplexity(tiny_llama.onnx_path, ids, ctx=64, progress=False)
    assert data["perplexity"]["ppl"] == pytest.approx(direct.ppl, rel=1e-9)
    assert data["perplexity"]["n_predicted"] == direct.n_predicted
    assert data["perplexity"]["windows"] == direct.n_windows
    assert data["perplexity"]["tokens_per_s"] > 0
    lw = data["last_word"]
    assert lw["n"] == 4 and len(lw["passages"]) == 4 and 0 <= lw["accuracy"] <= 1
    assert lw["accuracy"] == sum(p["correct"] for p in lw["passages"]) / 4
    assert data["settings"] == {"ctx": 64, "max_tokens": 200, "last_word": 4,
                                "last_word_context": LW_CONTEXT}
    assert data["model"] == str(tiny_llama.onnx_path) and data["text"] == str(lw_text)

    assert main([*args, "--last-word", "0", "--json", str(out)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert json.loads(out.read_text())["last_word"] is None
    assert main([*args, "--json", str(tmp_path / "missing" / "e.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_nbits(tiny_llama, tmp_path, capsys):
    from serq_onnx.cli import main

    out = tmp_path / "nbits"
    model = str(tiny_llama.onnx_path)
    assert main(["nbits", model, "-o", str(out), "--block-size", "32", "-q"]) == 0
    assert (out / "model.onnx").is_file()
    config = json.loads((out / "nbits_config.json").read_text())
    assert config["block_size"] == 32 and config["symmetric"] is True
    capsys.readouterr()
    assert main(["nbits", model, "-o", str(out), "-q"]) == 2  # not empty, no --overwrite
    assert main(["nbits", model, "-o", str(out), "--overwrite", "--asymmetric", "-q"]) == 0
    assert json.loads((out / "nbits_config.json").read_text())["symmetric"] is False
    bad = tmp_path / "bad"
    assert main(["nbits", model, "-o", str(bad), "--block-size", "48", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "power of two" in err[1] and not bad.exists()
