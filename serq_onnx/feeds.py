"""Inputs for one forward pass of an Optimum causal-LM export, with an empty KV cache."""

from __future__ import annotations

import numpy as np

from .errors import SerqError

_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _static(dim, what: str) -> int:
    if isinstance(dim, int):
        return dim
    raise SerqError(f"the model input {what} has a symbolic dimension {dim!r} where a fixed size "
                    "is expected (kv heads / head size); re-export with Optimum")


def causal_lm_feeds(inputs, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for ``session.get_inputs()`` (or IR graph inputs as (name, shape, dtype) triples).

    Causal LMs exported with ``text-generation-with-past`` take the past KV cache as inputs;
    an empty past (length 0) makes them run a plain prefill.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, length = ids.shape
    feeds: dict[str, np.ndarray] = {}
    names = []
    for inp in inputs:
        name, shape, typ = inp.name, list(inp.shape), inp.type
        names.append(name)
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, length), dtype=_ORT_TO_NP.get(typ, np.int64))
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif name.startswith("past_key_values") or name.startswith("past_"):
            if len(shape) != 4:
                raise SerqError(f"unexpected KV-cache input {name} of rank {len(shape)}")
            feeds[name] = np.zeros((batch, _static(shape[1], name), 0, _static(shape[3], name)),
                                   dtype=_ORT_TO_NP.get(typ, np.float32))
        else:
            raise SerqError(f"the model has an input {name!r} that a causal LM export does not "
                            "have; serq-onnx handles Optimum text-generation exports")
    if "input_ids" not in names:
        raise SerqError("the model has no input_ids input: it is not a causal LM export")
    return feeds
