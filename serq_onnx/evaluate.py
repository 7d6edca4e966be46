"""Perplexity, last-word accuracy and generation speed of Optimum causal-LM exports.

Everything runs through onnxruntime. Float and converted models are measured by the same code,
so their figures compare directly.
Any ``onnxruntime.InferenceSession`` works; converted models need one that registers the op
library (``serq_onnx.session(path)``), which the caller builds.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from .errors import SerqError

SessionLike = Union[Any, Callable[[], Any], str, os.PathLike]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
# Model metadata saying that past and present KV tensors may share one buffer (written by
# passes.FuseAttentionPass; genai's past_present_share_buffer is the same mode).
SHARE_BUFFER_KEY = "serq.past_present_share_buffer"
_LOGSOFTMAX_ROWS = 128  # rows per float64 block: bounds memory for large vocabularies


@dataclass(frozen=True)
class CausalLMSpec:
    """What the harness needs to know about a session's inputs and outputs."""

    input_dtypes: dict[str, type]
    past: list[tuple[str, str]]  # (past_key_values.i.key|value, present.i.key|value), by layer
    kv_heads: int
    head_dim: int
    past_dtype: type

    @property
    def has_past(self) -> bool:
        return bool(self.past)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over non-overlapping windows; ``seconds`` counts time inside ``session.run``.

    ``tokens_per_s`` is tokens fed to the model (all window tokens) per second of that time.
    """

    ppl: float
    nll_sum: float
    n_predicted: int
    n_windows: int
    seconds: float
    tokens_per_s: float


def open_session(model: SessionLike) -> Any:
    """A session from a session (returned as is), a zero-argument factory, or a model path.

    Paths of converted models (those importing the ``com.serq`` domain) are opened with the op
    library registered; float models with plain onnxruntime.
    """
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return model
    if callable(model):
        return open_session(model())
    path = Path(model)
    if not path.is_file():
        raise SerqError(f"{path} is not a file; pass an onnxruntime session or a model.onnx path")
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises several types for a corrupt or truncated file
        raise SerqError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    try:
        from .cache_dims import with_cache_dims

        so, providers = ort.SessionOptions(), ["CPUExecutionProvider"]
        if any(op.domain == "com.serq" for op in proto.opset_import):
            from .library import session_options

            so = session_options(so)
        return with_cache_dims(ort.InferenceSession(str(path), so, providers=providers), path,
                               so, providers)
    except SerqError:
        raise
    except Exception as err:  # onnxruntime reports an invalid graph as its own exception
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SerqError(f"onnxruntime cannot load {path}: {first}") from None


def causal_lm_spec(session: Any, *, need_outputs: bool = True) -> CausalLMSpec:
    """Check that ``session`` looks like an Optimum causal-LM export and describe it.

    ``need_outputs`` False checks the inputs only: a statistics graph cut short of the logits
    and the KV cache (``passes.calibrate``) is fed like the export it was cut from."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    where = "an Optimum causal-LM export (optimum-cli export onnx --task text-generation-with-past)"
    if not need_outputs:
        outputs |= {"logits"} | {f"present.{m.group(1)}.{m.group(2)}" for m in
                                 map(_PAST.match, inputs) if m}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise SerqError(f"model has no input_ids input or logits output; expected {where}")
    if "attention_mask" not in inputs:
        raise SerqError(f"model has no attention_mask input; expected {where}")
    layers: dict[int, dict[str, Any]] = {}
    for name, arg in inputs.items():
        m = _PAST.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = arg
        elif name not in ("input_ids", "attention_mask", "position_ids"):
            raise SerqError(f"model input {name!r} is not one the harness can feed; "
                            f"expected {where}")
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name in inputs and inputs[name].type not in ("tensor(int64)", "tensor(int32)"):
            raise SerqError(f"model input {name} has type {inputs[name].type}, not an integer "
                            f"type; expected {where}")

    past: list[tuple[str, str]] = []
    kv_heads = head_dim = 0
    past_dtype: type = np.float32
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise SerqError(f"model's past_key_values layers {sorted(layers)} are not 0..n-1; "
                            f"expected {where}")
        shapes, types = set(), set()
        for i in range(len(layers)):
            for kind in ("key", "value"):
                arg = layers[i].get(kind)
                present = f"present.{i}.{kind}"
                if arg is None or present not in outputs:
                    raise SerqError(f"model lacks past_key_values.{i}.{kind} or {present}; "
                                    f"expected {where}")
                if len(arg.shape) != 4 or not all(isinstance(d, int) for d in arg.shape[1::2]):
                    raise SerqError(f"{arg.name} has shape {arg.shape}, not [batch, kv_heads, "
                                    f"past, head_dim] with fixed kv_heads and head_dim; "
                                    f"expected {where}")
                shapes.add((arg.shape[1], arg.shape[3]))
                types.add(arg.type)
                past.append((arg.name, present))
        if len(shapes) != 1 or len(types) != 1 or next(iter(types)) not in _ORT_TYPES:
            raise SerqError(f"past_key_values inputs differ in shape or type ({shapes}, {types}); "
                            f"expected {where}")
        (kv_heads, head_dim), past_dtype = next(iter(shapes)), _ORT_TYPES[next(iter(types))]
    return CausalLMSpec(
        input_dtypes={n: _ORT_TYPES[inputs[n].type] for n in
                      ("input_ids", "attention_mask", "position_ids") if n in inputs},
        past=past, kv_heads=kv_heads, head_dim=head_dim, past_dtype=past_dtype)


def prefill_feed(spec: CausalLMSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one batch-1 sequence with an empty KV cache."""
    n = len(ids)
    dt = spec.input_dtypes
    feed = {"input_ids": ids.reshape(1, n).astype(dt["input_ids"]),
            "attention_mask": np.ones((1, n), dt["attention_mask"])}
    if "position_ids" in dt:
        feed["position_ids"] = np.arange(n, dtype=dt["position_ids"]).reshape(1, n)
    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), spec.past_dtype)
    feed.update({name: empty for name, _ in spec.past})
    return feed


def tokenize_text(tokenizer_dir: str | os.PathLike, text_path: str | os.PathLike,
                  max_tokens: int | None = None) -> np.ndarray:
    """Token ids (int64) of a UTF-8 text file, without special tokens (running text, no BOS)."""
    from .calibration import tokenize_file

    return tokenize_file(tokenizer_dir, text_path, max_tokens=max_tokens, purpose="evaluation")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target] per row, in float64."""
    total = 0.0
    for start in range(0, len(targets), _LOGSOFTMAX_ROWS):
        x = logits[start:start + _LOGSOFTMAX_ROWS].astype(np.float64)
        t = targets[start:start + _LOGSOFTMAX_ROWS]
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        total += float((lse - x[np.arange(len(t)), t]).sum())
    return total


def perplexity(session: SessionLike, token_ids: np.ndarray, ctx: int = 1024,
               max_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``token_ids`` in non-overlapping windows of ``ctx`` tokens.

    Each window starts with an empty cache and predicts its tokens 1..len-1 from the ones
    before, so ``n_predicted`` is the sum of (window length - 1); a last window shorter than 2
    tokens predicts nothing and is dropped.
    """
    if ctx < 2:
        raise SerqError(f"ctx={ctx} leaves nothing to predict; use ctx >= 2")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = [ids[s:s + ctx] for s in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise SerqError(f"{len(ids)} tokens are too few for perplexity; pass at least 2")
    sess = open_session(session)
    spec = causal_lm_spec(sess)
    from tqdm.auto import tqdm

    nll = seconds = 0.0
    n_pred = n_fed = 0
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        t0 = time.perf_counter()
        (logits,) = sess.run(["logits"], prefill_feed(spec, w))
        seconds += time.perf_counter() - t0
        nll += _nll(logits[0, :-1], w[1:])
        n_pred += len(w) - 1
        n_fed += len(w)
    return PerplexityResult(ppl=math.exp(nll / n_pred), nll_sum=nll, n_predicted=n_pred,
                            n_windows=len(windows), seconds=seconds,
                            tokens_per_s=n_fed / seconds if seconds > 0 else math.inf)


# Sentence-final words that say little about the passage: function words, pronouns, common
# verbs, and abbreviations that end in a full stop without ending a sentence.
STOP_WORDS = frozenset("""
    about above after again against all also and any are because been before being below
    between both but can cannot could did does doing down during each few for from further had
    has have having her here hers herself him himself his how into its itself just more most
    myself nor not now off once only other ought our ours ourselves out over own same she
    should some such than that the their theirs them themselves then there these they this
    those through too under until very was were what when where which while who whom why will
    with would you your yours yourself yourselves one yes say said says well upon shall
    must may might much many never ever else
    mrs messrs esq etc viz rev capt col gen
""".split())

# A word of 3+ letters after a single space, then . ! or ?, then optional closing quotes or
# brackets, then whitespace or the end of the text: the word that ends a sentence.
_LAST_WORD = re.compile(r"(?<= )([A-Za-z]{3,})[.!?][\"'\u201d\u2019)\]_]*(?=\s|$)")


@dataclass(frozen=True)
class LastWordPassage:
    """A context, then the tokens of ``" " + word``: the sentence-final word to predict.

    Tokenizing the context text followed by ``" " + word`` gives exactly ``context + target``,
    so predicting ``target`` greedily is producing the word as the model would write it.
    """

    context: tuple[int, ...]
    target: tuple[int, ...]
    word: str
    offset: int  # character offset of the word in the text


@dataclass(frozen=True)
class LastWordResult:
    """Last-word accuracy; ``seconds`` counts time inside ``session.run``.

    ``correct`` and ``predicted`` (the argmax token at each target position) are per passage;
    ``target_nll`` is the mean over passages of -log p(target tokens | context), in nats.
    """

    accuracy: float
    n: int
    seconds: float
    correct: tuple[bool, ...] = field(repr=False)
    predicted: tuple[tuple[int, ...], ...] = field(repr=False)
    target_nll: float


def _read_text(text_path: str | os.PathLike) -> str:
    path = Path(text_path)
    if not path.is_file():
        raise SerqError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SerqError(f"{path} is not UTF-8 text") from None


def last_word_passages(tokenizer_dir: str | os.PathLike, text_path: str | os.PathLike,
                       n: int = 200, context_tokens: int = 256) -> list[LastWordPassage]:
    """``n`` LAMBADA-style passages cut from a plain text, the same ones on every call.

    A candidate is a word of at least 3 letters, not in :data:`STOP_WORDS`, that follows a
    single space and ends a sentence (``.``, ``!`` or ``?``); its context is the
    ``context_tokens`` tokens of running text just before that space. A candidate is usable when
    the context text tokenizes to exactly those tokens and context + ``" " + word`` tokenizes to
    the context tokens followed by those of ``" " + word``. The candidates, in text order, are
    cut into ``n`` equal slices and each slice gives its first usable candidate, so passages are
    spread evenly through the text and depend only on the text, tokenizer, ``n`` and
    ``context_tokens``.
    """
    if n < 1 or context_tokens < 1:
        raise SerqError(f"last-word passages need n >= 1 and context_tokens >= 1 "
                        f"(got n={n}, context_tokens={context_tokens})")
    from .calibration import load_tokenizer

    text = _read_text(text_path)
    tok = load_tokenizer(tokenizer_dir, "evaluation")

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    full = tok.encode(text, add_special_tokens=False)
    starts = np.fromiter((o[0] for o in full.offsets), dtype=np.int64, count=len(full.ids))
    candidates: list[tuple[int, str, int]] = []  # (word offset, word, index of its first token)
    for m in _LAST_WORD.finditer(text):
        word = m.group(1)
        space = m.start(1) - 1
        i = int(np.searchsorted(starts, space))
        if word.lower() in STOP_WORDS or i < context_tokens or i >= len(starts):
            continue
        if starts[i] == space:  # a token begins at the space, as " word" would
            candidates.append((m.start(1), word, i))
    if len(candidates) < n:
        raise SerqError(f"{text_path} has {len(candidates)} sentence-final words with "
                        f"{context_tokens} tokens before them, fewer than the {n} passages asked "
                        f"for; ask for fewer (--last-word) or a shorter context "
                        f"(--last-word-context), or use a longer text")

    def usable(offset: int, word: str, i: int) -> LastWordPassage | None:
        context = full.ids[i - context_tokens:i]
        context_text = text[int(starts[i - context_tokens]):offset - 1]
        target = encode(" " + word)
        if encode(context_text) != context or encode(context_text + " " + word) != context + target:
            return None
        return LastWordPassage(context=tuple(context), target=tuple(target), word=word,
                               offset=offset)

    passages = []
    for k in range(n):
        lo, hi = k * len(candidates) // n, (k + 1) * len(candidates) // n
        found = next((p for c in candidates[lo:hi] if (p := usable(*c)) is not None), None)
        if found is None:
            raise SerqError(f"no usable last-word passage among candidates {lo}..{hi - 1} of "
                            f"{text_path} (the tokenizer splits them across the context); "
                            "ask for fewer passages (--last-word)")
        passages.append(found)
    return passages


def last_word_accuracy(session: SessionLike, passages: list[LastWordPassage],
                       progress: bool = True) -> LastWordResult:
    """Fraction of passages whose target word the model predicts exactly, by teacher forcing.

    One forward pass per passage (empty KV cache) over the context and all target tokens but the
    last; a passage is correct when the argmax at every target position is the target token,
    which is what greedy decoding of the word would produce.
    """
    if not passages:
        raise SerqError("no last-word passages to evaluate; pass at least one")
    for p in passages:
        if not p.context or not p.target:
            raise SerqError(f"passage at offset {p.offset} has an empty context or target; "
                            "build passages with last_word_passages")
    sess = open_session(session)
    spec = causal_lm_spec(sess)
    from tqdm.auto import tqdm

    seconds = nll = 0.0
    correct: list[bool] = []
    predicted: list[tuple[int, ...]] = []
    for p in tqdm(passages, desc="last word", unit="passage", disable=not progress):
        ids = np.asarray(p.context + p.target[:-1], dtype=np.int64)
        t0 = time.perf_counter()
        (logits,) = sess.run(["logits"], prefill_feed(spec, ids))
        seconds += time.perf_counter() - t0
        rows = logits[0, len(p.context) - 1:]  # row j predicts target[j]
        target = np.asarray(p.target, dtype=np.int64)
        pred = rows.argmax(axis=-1)
        predicted.append(tuple(int(t) for t in pred))
        correct.append(bool((pred == target).all()))
        nll += _nll(rows, target)
    return LastWordResult(accuracy=sum(correct) / len(correct), n=len(correct), seconds=seconds,
                          correct=tuple(correct), predicted=tuple(predicted),
                          target_nll=nll / len(correct))


def _device(sess: Any) -> tuple[str, int]:
    """Where the KV cache should live between decode steps: the session's first provider."""
    provider = sess.get_providers()[0]
    if provider == "CUDAExecutionProvider":
        opts = sess.get_provider_options().get(provider, {})
        return "cuda", int(opts.get("device_id", 0))
    return "cpu", 0


class _Greedy:
    """Greedy generation with the KV cache kept on the session's device between steps.

    With ``io_binding`` (the default) the ``present`` outputs stay onnxruntime OrtValues on the
    session's device and are bound as the next step's ``past_key_values`` inputs, so the cache
    never goes through numpy; the logits are written into a reused host buffer when the model's
    vocabulary size is fixed. ``io_binding=False`` is the plain ``session.run`` path with numpy
    arrays everywhere (the reference the bound path is tested against).
    """

    def __init__(self, sess: Any, spec: CausalLMSpec, io_binding: bool = True,
                 max_length: int | None = None):
        self.sess, self.spec, self.io_binding = sess, spec, io_binding
        self.device, self.device_id = _device(sess)
        # Graphs whose cache only GroupQueryAttention reads (the converter's fused attention
        # marks them) decode in place: one [1, kv_heads, max_length, head_dim] buffer per cache
        # tensor, bound as both past and present, so each step writes only its own position.
        self.shared: list[Any] | None = None
        if io_binding and max_length and _shares_buffer(sess):
            import onnxruntime as ort

            shape = [1, spec.kv_heads, int(max_length), spec.head_dim]
            self.shared = [ort.OrtValue.ortvalue_from_shape_and_type(
                shape, spec.past_dtype, self.device, self.device_id) for _ in spec.past]
            self.max_length = int(max_length)
        out = next(o for o in sess.get_outputs() if o.name == "logits")
        self._vocab = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
        self._logits_dtype = _ORT_TYPES.get(out.type)
        self._logits_bufs: dict[int, np.ndarray] = {}  # sequence length -> reused host buffer
        self._outputs = ["logits"] + [present for _, present in spec.past]

    def _logits_buffer(self, n: int) -> np.ndarray | None:
        if self._vocab is None or self._logits_dtype is None:
            return None
        buf = self._logits_bufs.get(n)
        if buf is None:
            if len(self._logits_bufs) > 4:  # prompts of many lengths: keep memory bounded
                self._logits_bufs.clear()
            buf = self._logits_bufs[n] = np.empty((1, n, self._vocab), self._logits_dtype)
        return buf

    def _run(self, feed: dict[str, np.ndarray], past: list[Any] | None) -> tuple[int, list[Any]]:
        if not self.io_binding:
            if past is None:
                past = [feed.pop(name) for name, _ in self.spec.past]
            feed.update({name: value for (name, _), value in zip(self.spec.past, past)})
            logits, *present = self.sess.run(self._outputs, feed)
            self.logits = logits
            return int(np.argmax(logits[0, -1])), present
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        if self.shared is not None:
            if feed["attention_mask"].shape[1] > self.max_length:
                raise SerqError(f"the sequence outgrew the {self.max_length}-position KV cache "
                                "buffer; give a larger max_length")
            past = self.shared  # on prefill its contents are ignored: the past length is 0
        if past is not None:
            for (name, _), value in zip(self.spec.past, past):
                binding.bind_ortvalue_input(name, value)
        buf = self._logits_buffer(feed["input_ids"].shape[1])
        if buf is None:
            binding.bind_output("logits", "cpu")
        else:
            binding.bind_output("logits", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        for i, (_, present) in enumerate(self.spec.past):
            if self.shared is not None:
                binding.bind_ortvalue_output(present, self.shared[i])
            else:
                binding.bind_output(present, self.device, self.device_id)
        self.sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = self.logits = outputs[0].numpy() if buf is None else buf
        return int(np.argmax(logits[0, -1])), (self.shared if self.shared is not None
                                               else list(outputs[1:]))

    def prefill(self, ids: np.ndarray) -> tuple[int, list[Any]]:
        return self._run(prefill_feed(self.spec, ids), None)

    def step(self, token: int, position: int, past: list[Any]) -> tuple[int, list[Any]]:
        dt = self.spec.input_dtypes
        feed = {"input_ids": np.array([[token]], dt["input_ids"]),
                "attention_mask": np.ones((1, position + 1), dt["attention_mask"])}
        if "position_ids" in dt:
            feed["position_ids"] = np.array([[position]], dt["position_ids"])
        return self._run(feed, past)


def _shares_buffer(sess: Any) -> bool:
    """Whether the model says its past and present KV tensors may share one buffer."""
    try:
        meta = sess.get_modelmeta().custom_metadata_map
    except AttributeError:  # a stand-in session without model metadata
        return False
    return meta.get(SHARE_BUFFER_KEY) == "1"


def decode_speed(session: SessionLike, prompt_ids: np.ndarray, new_tokens: int = 32,
                 warmup: bool = True, io_binding: bool = True) -> dict[str, Any]:
    """Greedy generation timed in two phases: prefill of the prompt, then one token at a time.

    The prefill yields the first new token; ``new_tokens - 1`` decode steps yield the rest, each
    feeding the KV cache of the previous step back (kept on the session's device). Returns
    ``prompt_tokens``, ``new_tokens``, ``prefill_seconds``, ``prefill_tokens_per_s``,
    ``decode_seconds``, ``decode_tokens_per_s`` and the generated ``tokens``.
    ``io_binding=False`` runs the plain numpy path instead (see :class:`_Greedy`).
    """
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if len(prompt) < 1 or new_tokens < 2:
        raise SerqError(f"decode_speed needs a non-empty prompt and new_tokens >= 2 "
                        f"(got {len(prompt)} prompt tokens, new_tokens={new_tokens})")
    sess = open_session(session)
    spec = causal_lm_spec(sess)
    if not spec.has_past:
        raise SerqError("model has no past_key_values inputs, so it cannot decode with a KV "
                        "cache; export it with --task text-generation-with-past")
    gen = _Greedy(sess, spec, io_binding=io_binding, max_length=len(prompt) + new_tokens)
    if warmup:  # first runs allocate and pick kernels; keep them out of the timings
        token, past = gen.prefill(prompt)
        gen.step(token, len(prompt), past)

    t0 = time.perf_counter()
    token, past = gen.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    tokens = [token]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        token, past = gen.step(token, len(prompt) + i, past)
        tokens.append(token)
    decode_s = time.perf_counter() - t0
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "prefill_seconds": prefill_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_seconds": decode_s, "decode_tokens_per_s": (new_tokens - 1) / decode_s,
            "tokens": tokens}


@dataclass(frozen=True)
class EvalReport:
    """What ``serq-onnx eval`` measured; ``str()`` is the printed summary, one line per metric."""

    model: str
    text: str
    settings: dict[str, Any]
    perplexity: PerplexityResult
    last_word: LastWordResult | None = None
    passages: tuple[LastWordPassage, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        r, s = self.perplexity, self.settings
        lines = [(f"{self.model}: perplexity {r.ppl:.4f} on {r.n_predicted} predicted tokens "
                  f"of {Path(self.text).name} ({r.n_windows} windows of {s['ctx']}), "
                  f"{r.tokens_per_s:.0f} tokens/s")]
        if self.last_word is not None:
            w = self.last_word
            lines.append(f"{self.model}: last-word accuracy {w.accuracy:.2%} "
                         f"({sum(w.correct)}/{w.n} passages of {s['last_word_context']} context "
                         f"tokens), target nll {w.target_nll:.3f} nats/word, "
                         f"{w.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results, with each passage's word, offset and correctness."""
        import onnxruntime

        r = self.perplexity
        out: dict[str, Any] = {
            "model": self.model, "text": self.text, "settings": dict(self.settings),
            "onnxruntime": onnxruntime.__version__,
            "perplexity": {"ppl": r.ppl, "nll_sum": r.nll_sum, "n_predicted": r.n_predicted,
                           "windows": r.n_windows, "seconds": r.seconds,
                           "tokens_per_s": r.tokens_per_s if math.isfinite(r.tokens_per_s)
                           else None},
            "last_word": None}
        if self.last_word is not None:
            w = self.last_word
            out["last_word"] = {
                "accuracy": w.accuracy, "n": w.n, "n_correct": sum(w.correct),
                "target_nll": w.target_nll, "seconds": w.seconds,
                "passages": [{"offset": p.offset, "word": p.word, "correct": c}
                             for p, c in zip(self.passages, w.correct)]}
        return out

    def write_json(self, path: str | os.PathLike) -> None:
        """Written beside ``path`` and renamed into place: never a half-written file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def evaluate_model_dir(model_dir: str | os.PathLike, text_path: str | os.PathLike, *,
                       ctx: int = 1024, max_tokens: int | None = None, last_word: int = 200,
                       last_word_context: int = 256, json_path: str | os.PathLike | None = None,
                       progress: bool = True) -> EvalReport:
    """``serq-onnx eval``: perplexity and last-word accuracy of a model on one text.

    Perplexity reads the first ``max_tokens`` tokens (all if None); the ``last_word`` passages
    (0: skip) are spread over the whole text. One session serves both. With ``json_path`` the
    report is also written there as JSON.
    """
    model_dir = Path(model_dir)
    model = model_dir / "model.onnx" if model_dir.is_dir() else model_dir
    if not model.is_file():
        raise SerqError(f"no model.onnx in {model_dir}")
    if last_word < 0:
        raise SerqError(f"--last-word must be >= 0 (0 skips it), got {last_word}")
    if json_path is not None:
        jp = Path(json_path)
        if jp.is_dir():
            raise SerqError(f"--json {json_path} is a folder; name a file, e.g. "
                            f"{jp / 'eval.json'}")
        if not jp.parent.is_dir():
            raise SerqError(f"the folder of the JSON output {json_path} does not exist; create "
                            "it or choose another path")
        if not os.access(jp.parent, os.W_OK) or (jp.exists() and not os.access(jp, os.W_OK)):
            raise SerqError(f"cannot write the JSON output {json_path}")
    if ctx < 2:
        raise SerqError(f"--ctx must be >= 2 (a window needs a token to predict), got {ctx}")
    if max_tokens is not None and max_tokens < 2:
        raise SerqError(f"--max-tokens must be >= 2, got {max_tokens}")
    if last_word and last_word_context < 1:
        raise SerqError(f"--last-word-context must be >= 1, got {last_word_context}")
    sess = open_session(model)  # a broken model fails before any text is read
    ids = tokenize_text(model.parent, text_path, max_tokens=max_tokens)
    passages = (last_word_passages(model.parent, text_path, n=last_word,
                                   context_tokens=last_word_context) if last_word else [])
    ppl = perplexity(sess, ids, ctx=ctx, progress=progress)
    lw = last_word_accuracy(sess, passages, progress=progress) if passages else None
    report = EvalReport(model=str(model), text=str(text_path),
                        settings={"ctx": ctx, "max_tokens": max_tokens, "last_word": last_word,
                                  "last_word_context": last_word_context},
                        perplexity=ppl, last_word=lw, passages=tuple(passages))
    if json_path is not None:
        report.write_json(json_path)
    return report
