"""Calibration and evaluation token streams from plain text, with the model's own tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import SerqError

# Default calibration size (sequences x tokens each), chosen from the perplexity-against-size
# curve of models/RESULTS-scale.md (SmolLM2-135M w4a8: 8 x 512 23.74, 32 x 512 23.23,
# 64 x 512 23.05): the curve flattens while calibration time grows with the tokens; 64 x 512
# converts in about 2.7 minutes on an idle 2-core machine, 128 x 2048 took 23.
DEFAULT_SAMPLES = 64
DEFAULT_SEQLEN = 512


def load_tokenizer(model_dir: str | os.PathLike, purpose: str = "calibration"):
    """The ``tokenizers`` tokenizer saved beside an Optimum export (tokenizer.json).

    ``purpose`` names what needs it (``calibration``, ``evaluation``) in the error message."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise SerqError(f"no tokenizer.json in {model_dir}: {purpose} text needs the model's "
                        "tokenizer beside model.onnx (Optimum's export puts it there)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own exception types
        raise SerqError(f"{path} is not a readable tokenizer ({err})") from None


def tokenize_file(model_dir: str | os.PathLike, text_path: str | os.PathLike,
                  max_tokens: int | None = None, purpose: str = "calibration") -> np.ndarray:
    """Running text as one token stream (no special tokens)."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise SerqError(f"text file not found: {text_path}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SerqError(f"{text_path} is not UTF-8 text") from None
    if max_tokens is not None:
        text = text[: max(max_tokens * 16, 4096)]  # generous: tokens are rarely > 16 chars
    ids = np.asarray(load_tokenizer(model_dir, purpose).encode(text, add_special_tokens=False).ids,
                     dtype=np.int64)
    if ids.size == 0:
        raise SerqError(f"{text_path} holds no text")
    return ids[:max_tokens] if max_tokens is not None else ids


def split_sequences(ids: np.ndarray, n_samples: int, seqlen: int) -> list[np.ndarray]:
    """Up to ``n_samples`` consecutive, non-overlapping sequences of ``seqlen`` tokens.

    A text shorter than one sequence gives one shorter sequence rather than nothing.
    """
    if seqlen < 2 or n_samples < 1:
        raise SerqError("--calib-seqlen must be >= 2 and --calib-samples >= 1")
    n = min(n_samples, len(ids) // seqlen)
    if n == 0:
        return [ids.copy()]
    return [ids[i * seqlen : (i + 1) * seqlen].copy() for i in range(n)]


def random_sequences(vocab: int, n_samples: int, seqlen: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=seqlen, dtype=np.int64) for _ in range(n_samples)]
