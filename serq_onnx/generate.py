"""Text in, text out: one converted model folder, its tokenizer and the KV-cache decode loop.

This is the whole of what a server does per request, kept free of any server so that the Ray
Serve replicas and a plain local call run the same code and must give the same tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import SerqError


class RequestError(SerqError):
    """A request the model cannot serve (too long, empty, bad parameter): the client's fault.

    ``param`` names the request field at fault, as OpenAI's error objects do."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 is greedy (argmax); otherwise softmax sampling
    at that temperature from the smallest set of tokens whose probability reaches ``top_p``,
    reproducible for a given ``seed``. Generation stops after ``max_tokens``, at an
    end-of-sequence token (unless ``ignore_eos``) or where the text reaches a ``stop`` string."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
                               "max_tokens")
        if not 0 <= self.temperature <= 100:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}",
                               "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings", "stop")


@dataclass(frozen=True)
class Completion:
    """One generated continuation. ``finish_reason``: ``length`` (max_tokens reached) or
    ``stop`` (end-of-sequence token or stop string; neither is part of ``text``)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...]
    finish_reason: str


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits (greedy at temperature 0)."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
        keep = order[before < params.top_p]  # always holds the most likely token
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SerqError(f"{path} is not valid JSON ({err}); re-export the model") from None
    return data if isinstance(data, dict) else {}


def _eos_ids(model_dir: Path) -> frozenset[int]:
    """End-of-sequence ids from generation_config.json, else config.json (int or list)."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            return frozenset(int(i) for i in ids if isinstance(i, int))
    return frozenset()


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The folder, after checking that it holds what serving needs: model.onnx of a causal LM
    with a KV cache, and tokenizer.json. Cheap (the graph only, no weights); raises SerqError."""
    import onnx

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise SerqError(f"{model_dir} is not a folder; pass the output folder of "
                        "`serq-onnx convert` (model.onnx, tokenizer.json, config files)")
    model = folder / "model.onnx"
    if not model.is_file():
        raise SerqError(f"no model.onnx in {model_dir}; pass the output folder of "
                        "`serq-onnx convert`")
    if not (folder / "tokenizer.json").is_file():
        raise SerqError(f"no tokenizer.json in {model_dir}: serving turns text into tokens with "
                        "the model's tokenizer; copy it beside model.onnx (Optimum's export "
                        "writes it)")
    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as err:  # protobuf raises several types for a corrupt file
        raise SerqError(f"{model} is not a readable ONNX model ({type(err).__name__})") from None
    names = {i.name for i in graph.input}
    if not {"input_ids", "attention_mask"} <= names or not any(
            n.startswith("past_key_values.") for n in names):
        raise SerqError(f"{model} has no input_ids, attention_mask and past_key_values inputs; "
                        "serving needs a causal LM exported with its KV cache (optimum-cli "
                        "export onnx --task text-generation-with-past), then converted")
    return folder


class Generator:
    """A model folder opened for generation: one onnxruntime session (op library registered),
    the tokenizer, the context length and end-of-sequence ids from the config files.

    Calls may run concurrently from several threads: each holds its own decode state
    (onnxruntime sessions are thread-safe)."""

    def __init__(self, model_dir: str | os.PathLike, threads: int = 0,
                 providers: list | None = None):
        from .calibration import load_tokenizer
        from .evaluate import causal_lm_spec
        from .library import get_library_path, session

        self.model_dir = check_model_dir(model_dir)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.op_library = get_library_path()
        try:
            self.session = session(self.model_dir / "model.onnx", providers=providers,
                                   sess_options=so)
        except SerqError:
            raise
        except Exception as err:  # onnxruntime's own exception types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SerqError(f"onnxruntime cannot load {self.model_dir / 'model.onnx'}: "
                            f"{first}") from None
        self.spec = causal_lm_spec(self.session)
        self.tokenizer = load_tokenizer(self.model_dir, "serving")
        config = _read_json(self.model_dir / "config.json")
        ctx = config.get("max_position_embeddings")
        self.max_length = int(ctx) if isinstance(ctx, int) and ctx > 0 else None
        self.eos_ids = _eos_ids(self.model_dir)

    def encode(self, text: str) -> list[int]:
        """Prompt ids as Hugging Face's ``tokenizer(text)`` gives them (special tokens added
        where the tokenizer's post-processor adds them, e.g. a BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _check_prompt(self, ids: Sequence[int], params: SamplingParams) -> np.ndarray:
        prompt = np.asarray(ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise RequestError("the prompt is empty (no tokens); give some text", "prompt")
        vocab = self.vocab_size
        if vocab is not None and (prompt.min() < 0 or prompt.max() >= vocab):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if self.max_length is not None and prompt.size + params.max_tokens > self.max_length:
            raise RequestError(f"{prompt.size} prompt tokens + max_tokens {params.max_tokens} "
                               f"exceed the model's context of {self.max_length} tokens; "
                               "shorten the prompt or lower max_tokens", "max_tokens")
        return prompt

    @property
    def vocab_size(self) -> int | None:
        out = next(o for o in self.session.get_outputs() if o.name == "logits")
        return out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams
                     ) -> tuple[list[int], str]:
        """New token ids and the finish reason (``length`` or ``stop``); the stop token or
        string is not included (stop strings: see :meth:`complete`)."""
        tokens, reason, _ = self._generate(prompt_ids, params)
        return tokens, reason

    def _generate(self, prompt_ids: Sequence[int], params: SamplingParams
                  ) -> tuple[list[int], str, str | None]:
        from .evaluate import _Greedy

        prompt = self._check_prompt(prompt_ids, params)
        gen = _Greedy(self.session, self.spec, max_length=len(prompt) + params.max_tokens)
        rng = np.random.default_rng(params.seed)
        eos = frozenset() if params.ignore_eos else self.eos_ids

        def pick(argmax: int) -> int:
            return argmax if params.temperature == 0 else next_token(gen.logits[0, -1], params,
                                                                     rng)

        argmax, past = gen.prefill(prompt)
        token = pick(argmax)
        tokens: list[int] = []
        while True:
            if token in eos:
                return tokens, "stop", None
            tokens.append(token)
            if params.stop:
                text = self.decode(tokens)
                cut = min((i for s in params.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    return tokens, "stop", text[:cut]
            if len(tokens) == params.max_tokens:
                return tokens, "length", None
            argmax, past = gen.step(token, len(prompt) + len(tokens) - 1, past)
            token = pick(argmax)

    def complete(self, prompt: str | Sequence[int], params: SamplingParams) -> Completion:
        """Generate a continuation of ``prompt`` (text, or token ids as they are)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        tokens, reason, text = self._generate(ids, params)
        return Completion(text=self.decode(tokens) if text is None else text,
                          token_ids=tuple(tokens), prompt_token_ids=tuple(ids),
                          finish_reason=reason)
