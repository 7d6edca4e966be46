"""The OpenAI completions protocol: request bodies checked into prompts and sampling
parameters, results and errors into OpenAI-shaped JSON. No server and no model here.

Supported: ``prompt`` (a string, a list of strings, a list of token ids or a list of such
lists), ``max_tokens`` (default 16), ``temperature`` (default 1, as OpenAI's; 0 is greedy),
``top_p``, ``seed``, ``stop`` and ``model``, plus ``ignore_eos`` (as vLLM has it). Fields that
change nothing at their neutral value (``n`` 1, ``stream`` false, ``echo`` false, zero
penalties...) are accepted there and refused elsewhere; unknown fields are refused, so that a
request never silently gets something other than it asked for. Each choice carries, beyond
OpenAI's fields, the generated ``token_ids``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .generate import Completion, RequestError, SamplingParams

MAX_PROMPTS = 32  # prompts in one request: bounds the work a single request can ask for

# Fields OpenAI defines that we accept only at the value that makes them do nothing.
_NEUTRAL = {"n": (1,), "best_of": (None, 1), "stream": (False,), "echo": (False,),
            "logprobs": (None, 0), "presence_penalty": (0,), "frequency_penalty": (0,),
            "logit_bias": (None, {}), "suffix": (None, ""), "stream_options": (None,)}
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
           "ignore_eos", "user"} | set(_NEUTRAL)


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request: each prompt is text or a list of token ids."""

    prompts: tuple[str | tuple[int, ...], ...]
    params: SamplingParams
    model: str | None


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {json.dumps(value)}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {json.dumps(value)}", key)
    return value


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
    return value == neutral


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in x)


def _prompts(body: dict) -> tuple[str | tuple[int, ...], ...]:
    if "prompt" not in body:
        raise RequestError("the request has no prompt; send {\"prompt\": \"...\"}", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        prompts: list = [p]
    elif _is_ids(p):
        prompts = [tuple(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(_is_ids(x) for x in p):
        prompts = [tuple(x) for x in p]
    else:
        raise RequestError("prompt must be a string, a list of strings, a list of token ids "
                           "or a list of such lists (non-empty)", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"{len(prompts)} prompts in one request; send at most {MAX_PROMPTS}",
                           "prompt")
    return tuple(prompts)


def parse_request(raw: bytes | str) -> CompletionRequest:
    """A completions request body, checked; raises :class:`RequestError` (HTTP 400)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(f"unsupported field(s) {', '.join(unknown)}; supported: "
                           f"{', '.join(sorted(_FIELDS))}", unknown[0])
    for key, allowed in _NEUTRAL.items():
        if key in body and not any(_same(body[key], a) for a in allowed):
            raise RequestError(f"{key}={json.dumps(body[key])} is not supported (only "
                               f"{' or '.join(json.dumps(a) for a in allowed)})", key)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError("stop must be a string or a list of at most 4 strings", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos must be true or false", "ignore_eos")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    params = SamplingParams(max_tokens=_integer(body, "max_tokens", 16),
                            temperature=_number(body, "temperature", 1.0),
                            top_p=_number(body, "top_p", 1.0),
                            seed=_integer(body, "seed", None), stop=stops, ignore_eos=ignore_eos)
    return CompletionRequest(prompts=_prompts(body), params=params, model=model)


def response(model: str, completions: Sequence[Completion], created: int | None = None
             ) -> dict[str, Any]:
    """An OpenAI ``text_completion`` object for the completions of one request."""
    prompt_tokens = sum(len(c.prompt_token_ids) for c in completions)
    new_tokens = sum(len(c.token_ids) for c in completions)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()) if created is None else created, "model": model,
            "choices": [{"index": i, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason, "token_ids": list(c.token_ids)}
                        for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                      "total_tokens": prompt_tokens + new_tokens}}


def error(message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models(model: str, created: int) -> dict[str, Any]:
    """The ``/v1/models`` list: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "serq-onnx"}]}
