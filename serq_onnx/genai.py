"""``genai_config.json`` for onnxruntime-genai, so a converted folder generates with ``og.Model``.

onnxruntime-genai (the runtime Microsoft ships LLMs with) reads the decoder's graph I/O names,
head counts and search defaults from a ``genai_config.json`` beside the model. It registers a
custom op library only from a path inside the model folder, an execution-provider folder or the
working directory, and refuses ``..``: so the op library is copied into the folder and named by
its bare file name. The I/O names are read from the graph itself (Optimum's and genai's own
builder's names are the same: ``past_key_values.N.key``, ``present.N.key``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import SerqError

GENAI_CONFIG = "genai_config.json"
SERQ_DOMAIN = "com.serq"
MS_DOMAIN = "com.microsoft"

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def _graph_io(model_path: Path) -> tuple[dict[str, list], dict[str, list], set[tuple[str, str]]]:
    """Input and output names with their shapes (ints or dim names), and the ops."""
    st = model_path.stat()
    return _read_graph_io(str(model_path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_graph_io(model_path: str, mtime_ns: int, size: int
                   ) -> tuple[dict[str, list], dict[str, list], set[tuple[str, str]]]:
    """:func:`_graph_io`, parsed once per file version (an inline-weight model is large)."""
    import onnx

    try:
        proto = onnx.load(model_path, load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise SerqError(f"{model_path} is not a readable ONNX model ({err})") from None

    def dims(v) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in proto.graph.input}
    outputs = {v.name: dims(v) for v in proto.graph.output}
    # (domain, op type) of every node, and each imported domain as (domain, "")
    ops = {(n.domain, n.op_type) for n in proto.graph.node} | {
        (o.domain, "") for o in proto.opset_import}
    return inputs, outputs, ops


def _layers(names: dict, pattern: re.Pattern) -> int:
    """Number of layers with both key and value named by ``pattern``, numbered from 0."""
    found: dict[int, set[str]] = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    n = len(found)
    if sorted(found) != list(range(n)) or any(v != {"key", "value"} for v in found.values()):
        return -1
    return n


def _search(folder: Path, context: int, share_buffer: bool) -> dict[str, Any]:
    """genai's search defaults, taking what ``generation_config.json`` sets (greedy otherwise)."""
    path = folder / "generation_config.json"
    gen = _load_json(path) if path.is_file() else {}

    def get(key: str, default: Any, kind: type) -> Any:
        value = gen.get(key)
        if value is None:
            return default
        if key == "early_stopping" and isinstance(value, str):  # transformers' "never"
            return value != "never"
        if kind is bool and isinstance(value, bool) or kind is not bool and isinstance(
                value, (int, float)) and not isinstance(value, bool):
            return kind(value)
        raise SerqError(f"{path}: {key} is {value!r}, not a {kind.__name__}; fix or remove it")

    return {
        "do_sample": get("do_sample", False, bool),
        "num_beams": get("num_beams", 1, int),
        "num_return_sequences": get("num_return_sequences", 1, int),
        "temperature": get("temperature", 1.0, float),
        "top_k": get("top_k", 50, int),
        "top_p": get("top_p", 1.0, float),
        "repetition_penalty": get("repetition_penalty", 1.0, float),
        "length_penalty": get("length_penalty", 1.0, float),
        "no_repeat_ngram_size": get("no_repeat_ngram_size", 0, int),
        "min_length": get("min_length", 0, int),
        "early_stopping": get("early_stopping", True, bool),
        "diversity_penalty": get("diversity_penalty", 0.0, float),
        # transformers' default max_length (20) is a placeholder; genai stops at the context.
        "max_length": context,
        "past_present_share_buffer": share_buffer,
    }


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SerqError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise SerqError(f"{path} holds no JSON object; fix or remove it")
    return data


def _cache_io(model_path: Path) -> tuple[dict[str, list], dict[str, list], int]:
    """Graph inputs, outputs and layer count, checked to be what genai's decoder feeds."""
    inputs, outputs, _ = _graph_io(model_path)
    for name, where in (("input_ids", inputs), ("logits", outputs)):
        if name not in where:
            raise SerqError(f"{model_path} has no {name!r} graph "
                            f"{'input' if where is inputs else 'output'}; genai needs a causal "
                            "LM exported with input_ids and logits")
    n_past, n_present = _layers(inputs, _PAST), _layers(outputs, _PRESENT)
    if n_past < 1 or n_past != n_present:
        raise SerqError(f"{model_path} has no KV cache genai can feed (past_key_values.N.key/"
                        "value inputs and present.N.key/value outputs for every layer N); "
                        "export with --task text-generation-with-past")
    return inputs, outputs, n_past


def _appends_in_place(model_path: Path) -> bool:
    """True if every layer's cache is GroupQueryAttention's, which writes the new entries into
    a preallocated buffer; a spelled-out ``Concat(past, new)`` cannot share one."""
    return (MS_DOMAIN, "GroupQueryAttention") in _graph_io(model_path)[2]


def genai_config(folder: str | os.PathLike, *, model_file: str = "model.onnx",
                 library_name: str | None = None, share_buffer: bool = True) -> dict[str, Any]:
    """The ``genai_config.json`` contents for ``folder``.

    Built from the Hugging Face ``config.json`` and ``model_file``'s graph I/O; a folder without
    ``config.json`` but with a ``genai_config.json`` (genai's builder writes only that) keeps
    that one, with the decoder file name and op library updated. ``library_name``: the op
    library's file name inside ``folder`` (None: the graph needs none). ``share_buffer``:
    genai's ``past_present_share_buffer``, one preallocated KV buffer that GroupQueryAttention
    appends to in place; off regardless for a graph whose attention is not GroupQueryAttention
    (``--no-fuse-attention``, or a fusion that was refused). Raises :class:`SerqError` for a
    folder this cannot describe.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SerqError(f"{folder} is not a folder; give the folder holding {model_file}")
    cfg_path, model_path = folder / "config.json", folder / model_file
    existing = folder / GENAI_CONFIG
    if not cfg_path.is_file() and not existing.is_file():
        raise SerqError(f"{folder} has no config.json (the Hugging Face model config) and no "
                        f"{GENAI_CONFIG}; copy the original model's config.json into it")
    if not model_path.is_file():
        raise SerqError(f"{folder} has no {model_file}; give the folder of a converted model")
    inputs, outputs, n_layers = _cache_io(model_path)
    share_buffer = share_buffer and _appends_in_place(model_path)
    if not cfg_path.is_file():
        cfg = _load_json(existing)
        decoder = cfg.get("model", {}).get("decoder")
        if not isinstance(decoder, dict):
            raise SerqError(f"{existing} has no model.decoder section; remove it and copy the "
                            "original model's config.json into the folder instead")
        decoder["filename"] = model_file
        session = decoder.setdefault("session_options", {})
        session.pop("custom_ops_library", None)
        if library_name is not None:
            session["custom_ops_library"] = library_name
        cfg.setdefault("search", {})["past_present_share_buffer"] = share_buffer
        return cfg
    hf = _load_json(cfg_path)
    try:
        heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_size = int(hf.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as err:
        raise SerqError(f"{cfg_path} lacks a usable {err} (num_attention_heads and hidden_size "
                        "are needed); is it a causal LM's config?") from None
    kv_shape = inputs["past_key_values.0.key"]
    if len(kv_shape) != 4:
        raise SerqError(f"{model_path}: past_key_values.0.key has shape {kv_shape}, not "
                        "[batch, kv_heads, past_length, head_size]")
    # The graph's fixed sizes win over the config's (they are what the session checks).
    kv_heads = kv_shape[1] if isinstance(kv_shape[1], int) and kv_shape[1] > 0 else kv_heads
    head_size = kv_shape[3] if isinstance(kv_shape[3], int) and kv_shape[3] > 0 else head_size
    context = int(hf.get("max_position_embeddings") or 2048)
    names = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            names[name] = name
    names |= {"past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library_name is not None:
        session["custom_ops_library"] = library_name
    decoder = {
        "session_options": session,
        "filename": model_file,
        "head_size": int(head_size),
        "hidden_size": hidden,
        "inputs": names,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": int(kv_heads),
    }
    model: dict[str, Any] = {"context_length": context, "decoder": decoder,
                             "type": str(hf.get("model_type", "llama"))}
    eos = hf.get("eos_token_id")
    pad = hf.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    for key, value in (("bos_token_id", hf.get("bos_token_id")), ("eos_token_id", eos),
                       ("pad_token_id", pad)):
        if value is not None:
            model[key] = value
    vocab = outputs["logits"][-1] if outputs["logits"] else None
    model["vocab_size"] = int(vocab) if isinstance(vocab, int) and vocab > 0 else int(
        hf.get("vocab_size", 0))
    return {"model": model, "search": _search(folder, context, share_buffer)}


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, then the temporary file renamed onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_genai_config(folder: str | os.PathLike, *, model_file: str = "model.onnx",
                       share_buffer: bool = True, library: str | os.PathLike | None = None
                       ) -> Path:
    """Write ``folder/genai_config.json`` (see :func:`genai_config`); returns its path.

    A graph with SerqMatMul nodes gets the op library (``library``, default
    :func:`serq_onnx.get_library_path`) copied into ``folder`` under its own file name, which
    the config names: genai loads custom op libraries only from inside the model folder. Both
    files are written through temporary files renamed into place, so a failure leaves the
    folder's files as they were.
    """
    folder = Path(folder)
    model_path = folder / model_file
    src = None
    if model_path.is_file() and any(d == SERQ_DOMAIN for d, _ in _graph_io(model_path)[2]):
        from .library import get_library_path

        src = Path(library if library is not None else get_library_path())
        if not src.is_file():
            raise SerqError(f"the op library {src} is not a file")
    cfg = genai_config(folder, model_file=model_file, share_buffer=share_buffer,
                       library_name=None if src is None else src.name)
    if src is not None:
        dst = folder / src.name
        if not (dst.exists() and dst.samefile(src)):
            _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    out = folder / GENAI_CONFIG
    _atomic_write(out, lambda tmp: tmp.write_text(json.dumps(cfg, indent=4) + "\n"))
    return out


def stage_for_conversion(folder: Path, model_file: str) -> str:
    """The conversion's hook, on its staging folder: a genai config where the input folder gave
    what it needs (its ``config.json``, or a ``genai_config.json`` to update), and what was
    done. A folder genai cannot run is no conversion failure: the reason is returned."""
    if not (folder / "config.json").is_file() and not (folder / GENAI_CONFIG).is_file():
        return f"{GENAI_CONFIG} not written: the input folder has no config.json"
    try:
        write_genai_config(folder, model_file=model_file)
    except SerqError as err:
        (folder / GENAI_CONFIG).unlink(missing_ok=True)  # a copied one would be stale
        return f"{GENAI_CONFIG} not written: {err}"
    return f"{GENAI_CONFIG} written (onnxruntime-genai loads the folder with og.Model)"


def generate(folder: str | os.PathLike, prompt_ids: Any, new_tokens: int = 32) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` after ``prompt_ids`` with onnxruntime-genai, timed as
    :func:`serq_onnx.evaluate.decode_speed` times a plain session: the prefill yields the first
    new token, each later step one more. Returns ``tokens`` (the new ones), ``prefill_seconds``,
    ``decode_seconds`` and ``decode_tokens_per_s``."""
    import time

    import numpy as np

    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise SerqError(f"onnxruntime-genai is not installed ({err}); run "
                        "`pip install 'serq-onnx[genai]'`") from None
    prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
    if prompt.size < 1 or new_tokens < 2:
        raise SerqError(f"generate needs a non-empty prompt and new_tokens >= 2 (got "
                        f"{prompt.size} prompt tokens, new_tokens={new_tokens})")
    try:
        model = og.Model(str(folder))
    except Exception as err:  # genai reports a bad folder as RuntimeError
        raise SerqError(f"onnxruntime-genai cannot load {folder}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(prompt.size + new_tokens), do_sample=False,
                              min_length=0)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    decode = time.perf_counter() - t0
    tokens = [int(t) for t in gen.get_sequence(0)[prompt.size:]]
    steps = max(len(tokens) - 1, 1)
    return {"tokens": tokens, "prefill_seconds": prefill, "decode_seconds": decode,
            "decode_tokens_per_s": steps / decode if decode > 0 else float("inf")}
