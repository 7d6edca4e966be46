"""SerqMatMul against onnxruntime's FP16 ``MatMul`` and ``MatMulNBits`` on a GPU, one process.

Per layer (Llama-3-8B shapes, M tokens), every kernel is a one-node model with FP16 activations
in its own onnxruntime session, timed warm through I/O binding with inputs and outputs as device
OrtValues (no host copies timed): the median of many ``run_with_iobinding`` calls, each ending
with the outputs synchronized, so a figure is what one onnxruntime call costs. Ratios are
baseline time / SerqMatMul time (> 1: SerqMatMul is faster). Also: the salient ``R`` rows' cost
(rank 128 vs 0), CUDA graph capture on/off at decode sizes, and a whole SmolLM2-shaped model in
FP16 vs SERQ (prefill and per-token decode). Every figure carries the device's name and the path
it took (onnxruntime CUDA EP, or Triton + torch when onnxruntime-gpu is unavailable).

A time budget bounds the run: cases that do not fit are skipped and listed as skipped.
``--rehearse`` runs the same code on the CPU execution provider with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import CORRECT, Results, format_markdown, write  # noqa: E402,F401

LLAMA3_8B_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
LLAMA3_MS = [1, 16, 256, 2048, 8192]
REHEARSE_SHAPES = [(256, 128), (128, 64)]
REHEARSE_MS = [1, 16, 64]
REHEARSE_TRITON = ([(64, 32)], [1, 3])  # Triton's interpreter is slow
IR_VERSION = 10
FPA_ENV = "ORT_FPA_INTB_GEMM"
# The fpA_intB switch is read when a MatMulNBits kernel is created (session initialization):
# the environment variable, or this session config entry in newer releases. Both are set for
# the sessions meant to use it, and neither for the others.
FPA_CONFIG = "ep.cuda.fpa_intb_gemm"


@dataclass
class Budget:
    """Seconds left for the benchmark; a case that does not fit is skipped, not started."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, need: float) -> bool:
        return self.left() > need


# -- one-node FP16 models ---------------------------------------------------------------------

def _model(node, inits: dict, K: int, N: int, domain: str | None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    a = helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["M", K])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["M", N])
    graph = helper.make_graph([node], "gpu_bench", [a], [y],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    # An IR version every onnxruntime since 1.17 reads (newer onnx writes one 1.31 refuses).
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    return model.SerializeToString()


def fp16_matmul(w: np.ndarray) -> bytes:
    from onnx import helper

    K, N = w.shape
    return _model(helper.make_node("MatMul", ["A", "W"], ["Y"]), {"W": w.astype(np.float16)},
                  K, N, None)


def matmul_nbits(w: np.ndarray, block: int) -> bytes:
    """Symmetric 4-bit, scale-only ``MatMulNBits`` with FP16 scales (FP16 activations): the
    form its CUDA fpA_intB path accepts."""
    from onnx import helper

    from serq_onnx.bench import nbits_weights

    K, N = w.shape
    packed, scales = nbits_weights(w, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=block)
    return _model(node, {"B": packed, "scales": scales.astype(np.float16)}, K, N,
                  "com.microsoft")


def serq_layer(w: np.ndarray, *, bits_a: int, rank: int, group_w: int = 128,
               group_a: int | None = None):
    """``(layout, weights, perm)`` of a SerqMatMul of ``w`` with a random channel permutation."""
    from serq_onnx import reference
    from serq_onnx.plan import DEFAULT_GROUP_A

    K, N = w.shape
    ga = DEFAULT_GROUP_A[f"w4a{bits_a}"] if group_a is None else group_a
    layout = reference.Layout(K=K, N=N, rank=min(rank, K), group_w=group_w, group_a=ga,
                              bits_w=4, bits_a=bits_a)
    perm = np.random.default_rng(0).permutation(K).astype(np.int64)
    return layout, reference.build_serq_weights(w, layout), perm


def serq_matmul(w: np.ndarray, **kw) -> bytes:
    from onnx import helper

    from serq_onnx import reference

    layout, wts, perm = serq_layer(w, **kw)
    node = helper.make_node(reference.OP_TYPE, ["A", "B", "scales", "wsum", "", "act_perm"],
                            ["Y"], domain=reference.DOMAIN, **layout.attributes())
    return _model(node, {"B": wts.B, "scales": wts.scales, "wsum": wts.wsum, "act_perm": perm},
                  *w.shape, reference.DOMAIN)


def layer_kernels(w: np.ndarray, quick: bool = False) -> dict:
    """name -> (model builder, fpA_intB on). ``quick`` keeps one of each family."""
    memo: dict[str, bytes] = {}

    def once(key, build):  # the fpA variants time the very same model bytes
        return lambda: memo[key] if key in memo else memo.setdefault(key, build())

    kernels = {
        "FP16 MatMul": (once("fp16", lambda: fp16_matmul(w)), False),
        "MatMulNBits b128": (once("nb128", lambda: matmul_nbits(w, 128)), False),
        "MatMulNBits b128 fpA": (once("nb128", lambda: matmul_nbits(w, 128)), True),
        "MatMulNBits b32": (once("nb32", lambda: matmul_nbits(w, 32)), False),
        "MatMulNBits b32 fpA": (once("nb32", lambda: matmul_nbits(w, 32)), True),
        "SerqMatMul w4a8": (once("a8", lambda: serq_matmul(w, bits_a=8, rank=128)), False),
        "SerqMatMul w4a8 r0": (once("a8r0", lambda: serq_matmul(w, bits_a=8, rank=0)), False),
        "SerqMatMul w4a4": (once("a4", lambda: serq_matmul(w, bits_a=4, rank=128)), False),
    }
    if quick:
        for k in ("MatMulNBits b32", "MatMulNBits b32 fpA"):
            kernels.pop(k)
    return kernels


# -- onnxruntime sessions and timing ----------------------------------------------------------

def make_session(model, provider: str, *, graph: bool = False, fpa: bool = False,
                 strict: bool = True):
    """A session on ``provider`` ('cuda' or 'cpu') with the op library registered. On CUDA and
    ``strict`` (one-node models), no node may fall back to the CPU (the session fails instead),
    so a figure is never the CPU's; whole models keep their shape computations on the CPU, as
    onnxruntime places them."""
    import onnxruntime as ort

    from serq_onnx.library import get_library_path

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(get_library_path())
    if provider == "cuda":
        if strict:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if fpa:
            so.add_session_config_entry(FPA_CONFIG, "1")
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if graph else {})]
    else:
        providers = ["CPUExecutionProvider"]
    old = os.environ.pop(FPA_ENV, None)
    if fpa:
        os.environ[FPA_ENV] = "1"
    try:
        source = model if isinstance(model, (bytes, bytearray)) else str(model)
        return ort.InferenceSession(source, so, providers=providers)
    finally:
        os.environ.pop(FPA_ENV, None)
        if old is not None:
            os.environ[FPA_ENV] = old


def device_value(arr: np.ndarray, provider: str):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(arr, "cuda" if provider == "cuda" else "cpu", 0)


def empty_value(shape, dtype, provider: str):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype,
                                                     "cuda" if provider == "cuda" else "cpu", 0)


def time_binding(sess, io, min_seconds: float, max_runs: int = 2000, warm: int = 3):
    """Median milliseconds of ``run_with_iobinding`` (outputs synchronized), and the run count."""
    for _ in range(warm):
        sess.run_with_iobinding(io)
    io.synchronize_outputs()
    runs: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(runs) < 5 or (time.perf_counter() < end and len(runs) < max_runs):
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1e3, len(runs)


def bench_layers(res: Results, shapes, ms, budget: Budget, *, min_seconds: float,
                 quick: bool = False, path: str = "onnxruntime") -> None:
    """Every kernel of :func:`layer_kernels` at every M, one shape at a time."""
    res.notes.append(f"fpA variants: {FPA_ENV}=1 and session config {FPA_CONFIG}=1 while the "
                     "session is created (MatMulNBits reads the switch when its kernel is "
                     "constructed); the others have neither. onnxruntime's default (compact) "
                     "fpA_intB build takes block 32 only, so 'b128 fpA' may run the default path")
    rng = np.random.default_rng(0)
    for K, N in shapes:
        if not budget.fits(20):
            res.skipped.append(f"layers {K}x{N}: all M (time budget)")
            continue
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        sessions = {}
        for name, (build, fpa) in layer_kernels(w, quick).items():
            if not budget.fits(15):
                res.skipped.append(f"layers {K}x{N} {name}: all M (time budget)")
                continue
            t = time.perf_counter()
            try:
                sessions[name] = make_session(build(), res.provider, fpa=fpa)
            except Exception as e:  # a baseline this onnxruntime cannot run is reported, not fatal
                res.skipped.append(f"layers {K}x{N} {name}: session failed: "
                                   f"{str(e).splitlines()[0][:200]}")
                continue
            res.notes.append(f"session {K}x{N} {name}: {time.perf_counter() - t:.1f} s to create")
        for M in ms:
            a = device_value(rng.standard_normal((M, K), dtype=np.float32).astype(np.float16),
                             res.provider)
            for name, sess in sessions.items():
                if not budget.fits(5 + 3 * min_seconds):
                    res.skipped.append(f"layers {K}x{N} M={M} {name} (time budget)")
                    continue
                try:
                    io = sess.io_binding()
                    io.bind_ortvalue_input("A", a)
                    io.bind_ortvalue_output("Y", empty_value((M, N), np.float16, res.provider))
                    t_ms, runs = time_binding(sess, io, min_seconds)
                except Exception as e:  # one failing kernel must not cost the others' figures
                    res.skipped.append(f"layers {K}x{N} M={M} {name}: "
                                       f"{str(e).splitlines()[0][:200]}")
                    continue
                res.add(section="layer", K=K, N=N, M=M, kernel=name, ms=t_ms, runs=runs,
                        path=path, device=res.device)
            checkpoint(res)
        del sessions


def bench_graphs(res: Results, shapes, ms, budget: Budget, *, min_seconds: float) -> None:
    """Decode sizes with CUDA graph capture on and off, same kernels, same inputs."""
    if res.provider != "cuda":
        res.skipped.append("cuda graphs: all (they need the CUDA execution provider)")
        return
    rng = np.random.default_rng(1)
    for K, N in shapes:
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        kernels = {k: v for k, v in layer_kernels(w, quick=True).items()
                   if k in ("FP16 MatMul", "MatMulNBits b128", "SerqMatMul w4a8")}
        for name, (build, fpa) in kernels.items():
            model = build()
            for M in ms:
                for graph in (False, True):
                    if not budget.fits(10):
                        res.skipped.append(f"graph {K}x{N} M={M} {name} graph={graph} "
                                           "(time budget)")
                        continue
                    try:
                        sess = make_session(model, "cuda", graph=graph, fpa=fpa)
                        io = sess.io_binding()
                        a = rng.standard_normal((M, K)).astype(np.float16)
                        io.bind_ortvalue_input("A", device_value(a, "cuda"))
                        io.bind_ortvalue_output("Y", empty_value((M, N), np.float16, "cuda"))
                        t_ms, runs = time_binding(sess, io, min_seconds)
                    except Exception as e:
                        res.skipped.append(f"graph {K}x{N} M={M} {name} graph={graph}: "
                                           f"{str(e).splitlines()[0][:200]}")
                        continue
                    res.add(section="graph", K=K, N=N, M=M, kernel=name, graph=graph, ms=t_ms,
                            runs=runs, path="onnxruntime", device=res.device)
            checkpoint(res)


def _feeds_on_device(spec, ids: np.ndarray, past_len: int, past, provider: str) -> dict:
    n = len(ids)
    dt = spec.input_dtypes
    feed = {"input_ids": ids.reshape(1, n).astype(dt["input_ids"]),
            "attention_mask": np.ones((1, past_len + n), dt["attention_mask"])}
    if "position_ids" in dt:
        feed["position_ids"] = np.arange(past_len, past_len + n,
                                         dtype=dt["position_ids"]).reshape(1, n)
    out = {k: device_value(v, provider) for k, v in feed.items()}
    if past is None:
        empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), spec.past_dtype)
        out.update({name: device_value(empty, provider) for name, _ in spec.past})
    else:
        out.update(past)
    return out


def _step(sess, spec, feeds: dict, provider: str):
    """One run with every input and output on the device; returns the present KV as inputs
    of the next step."""
    io = sess.io_binding()
    for k, v in feeds.items():
        io.bind_ortvalue_input(k, v)
    outs = ["logits"] + [present for _, present in spec.past]
    for name in outs:
        io.bind_output(name, "cuda" if provider == "cuda" else "cpu", 0)
    sess.run_with_iobinding(io)
    io.synchronize_outputs()
    values = io.get_outputs()
    return {past: values[1 + i] for i, (past, _) in enumerate(spec.past)}


def bench_model(res: Results, name: str, path: Path, budget: Budget, *, prefill: int,
                decode: int, repeats: int) -> None:
    """Prefill of ``prefill`` tokens (median of ``repeats``) and ``decode`` single-token steps
    after it (median per token), KV cache kept on the device between steps."""
    from serq_onnx.evaluate import causal_lm_spec

    if not budget.fits(30):
        res.skipped.append(f"model {name}: all (time budget)")
        return
    sess = make_session(path, res.provider, strict=False)
    spec = causal_lm_spec(sess)
    vocab = json.loads((path.parent / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(2).integers(0, vocab, size=prefill + decode, dtype=np.int64)
    _step(sess, spec, _feeds_on_device(spec, ids[:prefill], 0, None, res.provider), res.provider)
    pre = []
    for _ in range(repeats):
        if not budget.fits(15):
            break
        feeds = _feeds_on_device(spec, ids[:prefill], 0, None, res.provider)
        t = time.perf_counter()
        past = _step(sess, spec, feeds, res.provider)
        pre.append(time.perf_counter() - t)
    res.add(section="model", model=name, phase=f"prefill {prefill}",
            ms=statistics.median(pre) * 1e3,
            runs=len(pre), path="onnxruntime", device=res.device)
    steps = []
    for i in range(decode):
        if not budget.fits(10):
            res.skipped.append(f"model {name}: decode steps {i}..{decode - 1} (time budget)")
            break
        feeds = _feeds_on_device(spec, ids[prefill + i:prefill + i + 1], prefill + i, past,
                                 res.provider)
        t = time.perf_counter()
        past = _step(sess, spec, feeds, res.provider)
        steps.append(time.perf_counter() - t)
    if steps:
        res.add(section="model", model=name, phase=f"decode {len(steps)} (per token)",
                ms=statistics.median(steps) * 1e3, runs=len(steps), path="onnxruntime",
                device=res.device)


def check_logits(res: Results, name: str, path: Path) -> None:
    """The model on this provider against the same model on the CPU: logits of 48 tokens."""
    from serq_onnx import compare

    vocab = json.loads((path.parent / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(3).integers(0, vocab, size=48, dtype=np.int64)
    here = compare.logits(make_session(path, res.provider, strict=False), ids)
    cpu = compare.logits(make_session(path, "cpu"), ids)
    d = compare.diff(here, cpu)
    res.add(section="correctness", model=name, rel_rms=d.rel_rms, max_abs=d.max_abs,
            top1_agree=d.top1_agree,
            within=bool(d.rel_rms < CORRECT["rel_rms"] and d.top1_agree >= CORRECT["top1"]),
            path="onnxruntime", device=res.device)


# -- Triton + torch path (no onnxruntime-gpu) -------------------------------------------------

def bench_triton(res: Results, shapes, ms, budget: Budget, *, min_seconds: float) -> None:
    """The same layer shapes through the kernels' Python launcher (Triton JIT) against torch's
    FP16 matmul, on torch tensors."""
    dev = "cuda" if res.provider == "cuda" else "cpu"
    if dev == "cpu":  # the rehearsal: Triton's interpreter on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from serq_onnx.kernels import launch

    rng = np.random.default_rng(0)
    for K, N in shapes:
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        wt = torch.from_numpy(w).to(dev, torch.float16 if dev == "cuda" else torch.float32)
        prepared = {}
        for label, bits_a, rank in (("SerqMatMul w4a8", 8, 128), ("SerqMatMul w4a8 r0", 8, 0),
                                    ("SerqMatMul w4a4", 4, 128)):
            layout, wts, perm = serq_layer(w, bits_a=bits_a, rank=rank)
            prepared[label] = (launch.prepare_weights(wts.B, wts.scales, layout, device=dev),
                               torch.from_numpy(perm).to(dev))
        for M in ms:
            if not budget.fits(5 + 4 * min_seconds):
                res.skipped.append(f"triton {K}x{N} M={M}: all (time budget)")
                continue
            a = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(dev, wt.dtype)
            fns = {"torch FP16 matmul": lambda: a @ wt}
            for label, (dw, perm) in prepared.items():
                fns[label] = lambda dw=dw, perm=perm: launch.serq_matmul(a, dw, act_perm=perm)
            for label, fn in fns.items():
                try:
                    t_ms, runs = _time_torch(fn, dev, min_seconds)
                except Exception as e:
                    res.skipped.append(f"triton {K}x{N} M={M} {label}: "
                                       f"{str(e).splitlines()[0][:200]}")
                    continue
                res.add(section="triton", K=K, N=N, M=M, kernel=label, ms=t_ms, runs=runs,
                        path="triton+torch", device=res.device)
            checkpoint(res)


def _time_torch(fn, dev: str, min_seconds: float):
    import torch

    if dev == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=max(int(min_seconds * 1e3), 20),
                              return_mode="median")), -1
    fn()
    runs: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(runs) < 3 or (time.perf_counter() < end and len(runs) < 200):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    del torch
    return statistics.median(runs) * 1e3, len(runs)


# -- device and checkpoints ------------------------------------------------------------------

def device_name(provider: str) -> str:
    if provider != "cuda":
        from serq_onnx.bench import machine_name

        return f"CPU rehearsal: {machine_name()}"
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


_CHECKPOINT: list[Path] = []


def checkpoint(res: Results) -> None:
    """Write what is measured so far, so a run killed at its limit still reports it."""
    if _CHECKPOINT:
        write(res, _CHECKPOINT[0])


def run(args) -> Results:
    provider = "cpu" if args.rehearse else args.provider
    if provider == "cuda":
        try:  # torch first: it loads the CUDA libraries onnxruntime's provider needs
            import torch  # noqa: F401
        except ImportError:
            pass
    import onnxruntime as ort

    budget = Budget(args.budget)
    res = Results(device=device_name(provider), provider=provider, ort_version=ort.__version__)
    shapes = REHEARSE_SHAPES if args.rehearse else LLAMA3_8B_SHAPES
    ms = REHEARSE_MS if args.rehearse else LLAMA3_MS
    models = Path(args.models) if args.models else None
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    _CHECKPOINT[:] = [Path(args.out)]
    for step in steps:
        t = time.perf_counter()
        if step == "correctness" and models:
            for sub in ("fp16", "serq-w4a8"):
                check_logits(res, f"tiny-llama {sub}", models / "tiny-llama" / sub / "model.onnx")
        elif step == "layers":
            bench_layers(res, shapes, ms, budget, min_seconds=args.min_seconds,
                         quick=args.rehearse)
            if not any(r["kernel"].startswith("SerqMatMul") for r in res.rows
                       if r["section"] == "layer") and "triton" not in steps:
                res.notes.append("no SerqMatMul figure through onnxruntime (see Skipped): its "
                                 "kernels are timed through the Triton launcher instead")
                steps.insert(steps.index("layers") + 1, "triton")
        elif step == "graphs":
            bench_graphs(res, shapes, [1, 16], budget, min_seconds=args.min_seconds)
        elif step == "model" and models:
            name = "tiny-llama" if args.rehearse else "smollm2-shaped"
            prefill, decode = (16, 4) if args.rehearse else (512, 128)
            for sub in ("fp16", "serq-w4a8"):
                bench_model(res, f"{name} {sub}", models / name / sub / "model.onnx", budget,
                            prefill=prefill, decode=decode, repeats=3 if args.rehearse else 10)
        elif step == "triton":
            t_shapes, t_ms = REHEARSE_TRITON if args.rehearse else (shapes, ms)
            bench_triton(res, t_shapes, t_ms, budget, min_seconds=args.min_seconds)
        else:
            why = "no --models" if step in ("correctness", "model") else "unknown step"
            res.skipped.append(f"step {step}: {why}")
            continue
        res.notes.append(f"step {step}: {time.perf_counter() - t:.1f} s")
        write(res, Path(args.out))  # what finished so far survives a kill at the limit
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_bench.md and gpu_bench.json")
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--rehearse", action="store_true",
                   help="CPU execution provider, tiny shapes: proves the code paths")
    p.add_argument("--models", default=None, help="folder of the carried models")
    p.add_argument("--steps", default="correctness,layers,model,graphs",
                   help="comma-separated: correctness, layers, graphs, model, triton")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--min-seconds", type=float, default=0.2, help="timing per case")
    args = p.parse_args(argv)
    res = run(args)
    md, js = write(res, Path(args.out))
    print(md.read_text())
    print(f"gpu_bench: wrote {md} and {js}; {len(res.rows)} figures, "
          f"{len(res.skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
