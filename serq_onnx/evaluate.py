"""Perplexity and generation speed of Optimum causal-LM exports, through onnxruntime.

Float and converted models are measured by the same code, so their figures compare directly.
Any ``onnxruntime.InferenceSession`` works; converted models need one that registers the op
library (``serq_onnx.session(path)``), which the caller builds.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from .errors import SerqError

SessionLike = Union[Any, Callable[[], Any], str, os.PathLike]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
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

    proto = onnx.load(str(path), load_external_data=False)
    if any(op.domain == "com.serq" for op in proto.opset_import):
        from .library import session

        return session(path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def causal_lm_spec(session: Any) -> CausalLMSpec:
    """Check that ``session`` looks like an Optimum causal-LM export and describe it."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    where = "an Optimum causal-LM export (optimum-cli export onnx --task text-generation-with-past)"
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


def _prefill_feed(spec: CausalLMSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
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

    return tokenize_file(tokenizer_dir, text_path, max_tokens=max_tokens)


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
        (logits,) = sess.run(["logits"], _prefill_feed(spec, w))
        seconds += time.perf_counter() - t0
        nll += _nll(logits[0, :-1], w[1:])
        n_pred += len(w) - 1
        n_fed += len(w)
    return PerplexityResult(ppl=math.exp(nll / n_pred), nll_sum=nll, n_predicted=n_pred,
                            n_windows=len(windows), seconds=seconds,
                            tokens_per_s=n_fed / seconds if seconds > 0 else math.inf)


def _device(sess: Any) -> tuple[str, int]:
    """Where the KV cache should live between decode steps: the session's first provider."""
    provider = sess.get_providers()[0]
    if provider == "CUDAExecutionProvider":
        opts = sess.get_provider_options().get(provider, {})
        return "cuda", int(opts.get("device_id", 0))
    return "cpu", 0


class _Greedy:
    """Greedy generation with the KV cache kept on the session's device between steps."""

    def __init__(self, sess: Any, spec: CausalLMSpec):
        self.sess, self.spec = sess, spec
        self.device, self.device_id = _device(sess)

    def _run(self, feed: dict[str, np.ndarray], past: list[Any] | None) -> tuple[int, list[Any]]:
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        if past is not None:
            for (name, _), value in zip(self.spec.past, past):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for _, present in self.spec.past:
            binding.bind_output(present, self.device, self.device_id)
        self.sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        return int(np.argmax(logits[0, -1])), list(outputs[1:])

    def prefill(self, ids: np.ndarray) -> tuple[int, list[Any]]:
        return self._run(_prefill_feed(self.spec, ids), None)

    def step(self, token: int, position: int, past: list[Any]) -> tuple[int, list[Any]]:
        dt = self.spec.input_dtypes
        feed = {"input_ids": np.array([[token]], dt["input_ids"]),
                "attention_mask": np.ones((1, position + 1), dt["attention_mask"])}
        if "position_ids" in dt:
            feed["position_ids"] = np.array([[position]], dt["position_ids"])
        return self._run(feed, past)


def decode_speed(session: SessionLike, prompt_ids: np.ndarray, new_tokens: int = 32,
                 warmup: bool = True) -> dict[str, Any]:
    """Greedy generation timed in two phases: prefill of the prompt, then one token at a time.

    The prefill yields the first new token; ``new_tokens - 1`` decode steps yield the rest, each
    feeding the KV cache of the previous step back (kept on the session's device). Returns
    ``prompt_tokens``, ``new_tokens``, ``prefill_seconds``, ``prefill_tokens_per_s``,
    ``decode_seconds``, ``decode_tokens_per_s`` and the generated ``tokens``.
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
    gen = _Greedy(sess, spec)
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


def evaluate_model_dir(model_dir: str | os.PathLike, text_path: str | os.PathLike, *,
                       ctx: int = 1024, max_tokens: int | None = None,
                       progress: bool = True) -> str:
    """``serq-onnx eval``: perplexity of the model in ``model_dir`` on a text, as a report line."""
    model_dir = Path(model_dir)
    model = model_dir / "model.onnx" if model_dir.is_dir() else model_dir
    if not model.is_file():
        raise SerqError(f"no model.onnx in {model_dir}")
    ids = tokenize_text(model.parent, text_path, max_tokens=max_tokens)
    r = perplexity(model, ids, ctx=ctx, progress=progress)
    return (f"{model}: perplexity {r.ppl:.4f} on {r.n_predicted} predicted tokens of "
            f"{Path(text_path).name} ({r.n_windows} windows of {ctx}), "
            f"{r.tokens_per_s:.0f} tokens/s")
