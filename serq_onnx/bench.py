"""``serq-onnx bench``: SerqMatMul against onnxruntime's own kernels, same process, same shapes.

Kernels (:data:`KERNELS`): float ``MatMul`` (MLAS sgemm); ``MatMulNBits`` (onnxruntime's 4-bit
weight-only op) with blocks of 32 and 128 at ``accuracy_level`` 0 (float compute) and 4 (its CPU
kernel quantizes the activations to int8 too); onnxruntime's dynamic int8
(``com.microsoft::DynamicQuantizeMatMul``: int8 weights with per-column scales, activations
quantized per call; ``DynamicQuantizeLinear`` + ``MatMulInteger`` + scale ``Mul`` where that op
is missing); ``SerqMatMul`` w4a8 and w4a4.

What is timed is the kernels, not Python: each case model holds ``L`` independent nodes of one
kernel, all reading the same input ``A``, each with its own copy of the weights (the columns of
the same random matrix in another order, so every copy is distinct in memory and in value), and
every node's output is a graph output, so onnxruntime can neither prune nor fold a node (the
tests check this with its profiler). ``L`` is chosen so the copies add up to at least
:data:`TARGET_BYTES` (at decode sizes the weights stream from memory as in a real model instead
of being served from cache), between :data:`MIN_NODES` and :data:`MAX_NODES`; it is cut to the
memory budget, and at large ``M``, where one node is long enough to hide the call overhead and the
weights are reused across rows anyway, to :data:`FLOP_BUDGET` of work per run (at least two
nodes). Time per node = median session time / ``L``, after a warm-up.

Ratios are baseline time / SerqMatMul time, so > 1 means SerqMatMul is faster.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import reference
from .errors import SerqError

SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
# Llama-3-8B: q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
SUITES = {"smollm2": SMOLLM2_SHAPES, "llama3-8b": LLAMA3_8B_SHAPES,
          "all": SMOLLM2_SHAPES + LLAMA3_8B_SHAPES}
DEFAULT_SUITE = "smollm2"
DEFAULT_MS = [1, 8, 128, 512]

FLOAT = "float MatMul"
NBITS = ("MatMulNBits b32", "MatMulNBits b128", "MatMulNBits b32 int8", "MatMulNBits b128 int8")
DYNAMIC_INT8 = "dynamic int8"
SERQ = ("SerqMatMul w4a8", "SerqMatMul w4a4")
KERNELS = (FLOAT, *NBITS, DYNAMIC_INT8, *SERQ)
# Short column names of the text table.
SHORT = {FLOAT: "fp32", NBITS[0]: "NB32", NBITS[1]: "NB128", NBITS[2]: "NB32-i8",
         NBITS[3]: "NB128-i8", DYNAMIC_INT8: "dyn-i8", SERQ[0]: "w4a8", SERQ[1]: "w4a4"}
# MatMulNBits variants: (block, accuracy_level).
NBITS_VARIANTS = {NBITS[0]: (32, 0), NBITS[1]: (128, 0), NBITS[2]: (32, 4), NBITS[3]: (128, 4)}

MIB = 1 << 20
TARGET_BYTES = 64 * MIB  # weights of one case model, at least (if the node cap allows)
MIN_NODES = 8
MAX_NODES = 64
FLOP_BUDGET = 16e9  # multiply-adds x 2 of one run, at most (but >= 2 nodes)
DEFAULT_MEMORY_MIB = 1024  # weight copies of one kernel, all M together


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
                                 if f in have)
    except OSError:
        pass
    import onnxruntime as ort

    return f"{cpu} [{flags}], {os.cpu_count()} logical CPUs, onnxruntime {ort.__version__}"


def threads_line(threads: int) -> str:
    return f"intra-op threads: {threads if threads else '0 (onnxruntime default)'}"


# --------------------------------------------------------------------------- one layer

NodeMaker = Callable[[dict, str, str, str], list]  # (input names by role, A, Y, tag) -> nodes


@dataclass
class Layer:
    """One linear layer ``Y = A @ W`` as one kernel: its weight inputs by role and how to make
    its node(s). ``n_axis[role] = (axis, run)``: along ``axis`` the array holds N columns of
    ``run`` consecutive elements each (absent: not per column, copied as is)."""

    kernel: str
    K: int
    N: int
    weights: dict
    n_axis: dict
    make: NodeMaker
    domains: tuple = ()
    custom: bool = False  # needs the serq-onnx op library

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.weights.values())

    def permuted(self, perm: np.ndarray) -> dict:
        """Weights of the same layer with its output columns in the order ``perm`` (fresh
        arrays)."""
        out = {}
        for role, arr in self.weights.items():
            if role not in self.n_axis:
                out[role] = arr.copy()
                continue
            axis, run = self.n_axis[role]
            idx = perm if run == 1 else (perm[:, None] * run + np.arange(run)).reshape(-1)
            out[role] = np.ascontiguousarray(np.take(arr, idx, axis=axis))
        return out


def _names(weights: dict, sfx: str) -> dict:
    return {role: role + sfx for role in weights}


def float_layer(w: np.ndarray) -> Layer:
    K, N = w.shape

    def make(names, a, y, tag):
        return [helper.make_node("MatMul", [a, names["W"]], [y], name=f"matmul{tag}")]

    return Layer(FLOAT, K, N, {"W": np.ascontiguousarray(w, np.float32)}, {"W": (1, 1)}, make)


def nbits_weights(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit ``MatMulNBits`` inputs of ``w [K, N]``: packed ``B [N, nb, block/2]``
    (uint8) and scales ``[N * nb]`` (float32), round to nearest with absmax scales."""
    K, N = w.shape
    nb = -(-K // block)
    wp = np.zeros((nb * block, N), np.float32)
    wp[:K] = w
    g = wp.reshape(nb, block, N)
    scale = np.abs(g).max(axis=1) / 7
    scale[scale == 0] = 1
    q = np.clip(np.rint(g / scale[:, None, :]), -8, 7).astype(np.int16) + 8  # [nb, block, N]
    q = q.transpose(2, 0, 1).astype(np.uint8)  # [N, nb, block]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), scale.T.astype(np.float32).reshape(-1)


def nbits_layer(w: np.ndarray, block: int, accuracy_level: int, kernel: str | None = None) -> Layer:
    K, N = w.shape
    packed, scales = nbits_weights(w, block)
    nb = packed.shape[1]

    def make(names, a, y, tag):
        return [helper.make_node("MatMulNBits", [a, names["B"], names["scales"]], [y],
                                 name=f"nbits{tag}", domain="com.microsoft", K=K, N=N, bits=4,
                                 block_size=block, accuracy_level=accuracy_level)]

    kernel = kernel or f"MatMulNBits b{block}" + (" int8" if accuracy_level == 4 else "")
    return Layer(kernel, K, N, {"B": packed, "scales": scales}, {"B": (0, 1), "scales": (0, nb)},
                 make, ("com.microsoft",))


def int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8 weights of ``w [K, N]``: codes ``[K, N]`` and scales ``[N]``."""
    scale = np.abs(w).max(axis=0) / 127
    scale[scale == 0] = 1
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale.astype(np.float32)


@functools.lru_cache(maxsize=None)
def has_dynamic_quantize_matmul() -> bool:
    """Whether this onnxruntime runs ``com.microsoft::DynamicQuantizeMatMul`` on the CPU."""
    import onnxruntime as ort

    w = np.ones((4, 2), np.float32)
    try:
        layer = dynamic_int8_layer(w, fused=True)
        ort.InferenceSession(_embedded([layer.weights], layer).SerializeToString(),
                             providers=["CPUExecutionProvider"])
        return True
    except Exception:  # NOT_IMPLEMENTED / unknown op: use the unfused form
        return False


def dynamic_int8_layer(w: np.ndarray, fused: bool | None = None) -> Layer:
    """onnxruntime's dynamic int8 matmul: int8 weights, per-column scales, ``A`` quantized to
    uint8 (per tensor, asymmetric) on every call. ``fused`` None: ``DynamicQuantizeMatMul``
    where available, else ``DynamicQuantizeLinear`` + ``MatMulInteger`` + two ``Mul``."""
    K, N = w.shape
    q, scale = int8_weights(w)
    if fused is None:
        fused = has_dynamic_quantize_matmul()

    def make(names, a, y, tag):
        if fused:
            return [helper.make_node("DynamicQuantizeMatMul", [a, names["B"], names["b_scale"]],
                                     [y], name=f"dqmm{tag}", domain="com.microsoft")]
        aq, sa, za, acc, accf, ys = (f"{x}{tag}" for x in ("aq", "sa", "za", "acc", "accf", "ys"))
        return [helper.make_node("DynamicQuantizeLinear", [a], [aq, sa, za], name=f"dql{tag}"),
                helper.make_node("MatMulInteger", [aq, names["B"], za], [acc], name=f"mmi{tag}"),
                helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=f"cast{tag}"),
                helper.make_node("Mul", [accf, sa], [ys], name=f"mul_a{tag}"),
                helper.make_node("Mul", [ys, names["b_scale"]], [y], name=f"mul_b{tag}")]

    return Layer(DYNAMIC_INT8, K, N, {"B": q, "b_scale": scale},
                 {"B": (1, 1), "b_scale": (0, 1)}, make, ("com.microsoft",) if fused else ())


def serq_layer(w: np.ndarray, *, bits_a: int, rank: int, group: int, group_a: int,
               kernel: str | None = None) -> Layer:
    """SerqMatMul of ``w`` with a random run-time channel permutation: the weights are built
    from ``w[perm]`` and ``act_perm = perm``, so the layer computes ``A @ w`` (up to rounding)."""
    K, N = w.shape
    layout = reference.Layout(K=K, N=N, rank=min(rank, K), group_w=group, group_a=group_a,
                              bits_w=4, bits_a=bits_a)
    perm = np.random.default_rng(0).permutation(K).astype(np.int64)
    wts = reference.build_serq_weights(np.asarray(w, np.float32)[perm], layout)
    attrs = layout.attributes()

    def make(names, a, y, tag):
        inputs = [a, names["B"], names["scales"], names["wsum"], "", names["act_perm"]]
        return [helper.make_node(reference.OP_TYPE, inputs, [y], name=f"serq{tag}",
                                 domain=reference.DOMAIN, **attrs)]

    return Layer(kernel or f"SerqMatMul w4a{bits_a}", K, N,
                 {"B": wts.B, "scales": wts.scales, "wsum": wts.wsum, "act_perm": perm},
                 {"B": (0, 1), "scales": (0, 1), "wsum": (0, 1)}, make, (reference.DOMAIN,),
                 custom=True)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def make_layer(kernel: str, w: np.ndarray, *, rank: int = 128, group: int = 128,
               group_a: int | None = None) -> Layer:
    """The layer of one of :data:`KERNELS` for ``w [K, N]``."""
    from .plan import DEFAULT_GROUP_A

    if kernel == FLOAT:
        return float_layer(w)
    if kernel in NBITS_VARIANTS:
        return nbits_layer(w, *NBITS_VARIANTS[kernel], kernel=kernel)
    if kernel == DYNAMIC_INT8:
        return dynamic_int8_layer(w)
    if kernel in SERQ:
        scheme = kernel.split()[-1]
        return serq_layer(w, bits_a=int(scheme[-1]), rank=rank, group=group,
                          group_a=_or(group_a, DEFAULT_GROUP_A[scheme]), kernel=kernel)
    raise SerqError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")


# --------------------------------------------------------------------------- models


def _graph(copies: list[dict], layer: Layer, *, external: bool,
           suffixed: bool) -> onnx.ModelProto:
    """``len(copies)`` independent nodes of ``layer`` on input ``A``, outputs ``Y_0 ..``
    (``suffixed``, tensors ``<role>_<i>``) or ``Y`` (one copy, tensors ``<role>``); initializers
    embedded, or (``external``) placeholders whose data is handed
    to onnxruntime with ``SessionOptions.add_external_initializers`` (no 2 GB protobuf limit,
    no copy through protobuf)."""
    K, N = layer.K, layer.N
    nodes, inits, outputs = [], [], []
    for i, wts in enumerate(copies):
        sfx = f"_{i}" if suffixed else ""
        names = _names(wts, sfx)
        y = "Y" + sfx
        nodes += layer.make(names, "A", y, sfx)
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", N]))
        for role, arr in wts.items():
            if external:
                t = TensorProto(name=names[role], dims=arr.shape,
                                data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
                t.data_location = TensorProto.EXTERNAL
                entry = t.external_data.add()
                entry.key, entry.value = "location", "serq-bench-in-memory"
                inits.append(t)
            else:
                inits.append(numpy_helper.from_array(arr, names[role]))
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])
    graph = helper.make_graph(nodes, "bench", [a], outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1) for d in layer.domains]
    return helper.make_model(graph, opset_imports=opsets)


def _embedded(copies: list[dict], layer: Layer) -> onnx.ModelProto:
    return _graph(copies, layer, external=False, suffixed=len(copies) > 1)


def float_matmul(w: np.ndarray) -> bytes:
    """A one-node float ``MatMul`` model of ``w`` (input ``A``, output ``Y``)."""
    layer = float_layer(w)
    return _embedded([layer.weights], layer).SerializeToString()


def matmul_nbits(w: np.ndarray, block: int, accuracy_level: int) -> bytes:
    """A symmetric 4-bit ``MatMulNBits`` of ``w`` (values matter little for timing, but are real)."""
    layer = nbits_layer(w, block, accuracy_level)
    return _embedded([layer.weights], layer).SerializeToString()


def dynamic_int8_matmul(w: np.ndarray, fused: bool | None = None) -> bytes:
    layer = dynamic_int8_layer(w, fused)
    return _embedded([layer.weights], layer).SerializeToString()


def serq_matmul(w: np.ndarray, *, bits_a: int, rank: int, group: int, group_a: int) -> bytes:
    """A one-node SerqMatMul model of ``w`` (weights ``B``, ``scales``, ``wsum``, ``act_perm``)."""
    layer = serq_layer(w, bits_a=bits_a, rank=rank, group=group, group_a=group_a)
    return _embedded([layer.weights], layer).SerializeToString()


class Chain:
    """Up to ``capacity`` distinct weight copies of one layer; ``model(L)`` / ``session(L)``
    use the first ``L`` of them (copy 0 is the layer's own weights, copy i its columns in a
    fixed random order)."""

    def __init__(self, layer: Layer, capacity: int, seed: int = 0):
        self.layer = layer
        rng = np.random.default_rng(seed)
        self.perms = [np.arange(layer.N)] + [rng.permutation(layer.N) for _ in range(capacity - 1)]
        self.copies = [layer.weights] + [layer.permuted(p) for p in self.perms[1:]]

    @property
    def capacity(self) -> int:
        return len(self.copies)

    def model(self, L: int, *, external: bool = False) -> onnx.ModelProto:
        """The first ``L`` copies as ``L`` nodes, tensors named ``<role>_<i>``, outputs
        ``Y_<i>``; ``external``: see :func:`_graph`."""
        if not 1 <= L <= self.capacity:
            raise ValueError(f"L={L} outside 1..{self.capacity}")
        return _graph(self.copies[:L], self.layer, external=external, suffixed=True)

    def session(self, L: int, *, threads: int = 0, profile_prefix: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        if self.layer.custom:
            from .library import get_library_path

            so.register_custom_ops_library(get_library_path())
        names, values = [], []
        for i in range(L):
            for role, arr in self.copies[i].items():
                names.append(f"{role}_{i}")
                values.append(ort.OrtValue.ortvalue_from_numpy(arr))
        so.add_external_initializers(names, values)
        sess = ort.InferenceSession(self.model(L, external=True).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        sess._serq_bench_keep = values  # the session reads these buffers: keep them alive
        return sess


def nodes_for(nbytes: int, M: int, K: int, N: int, *, nodes: int = 0,
              memory_mib: int = DEFAULT_MEMORY_MIB) -> int:
    """L for one case: ``nodes`` if given, else enough copies for :data:`TARGET_BYTES` within
    [MIN_NODES, MAX_NODES] and at most :data:`FLOP_BUDGET` of work per run (>= 2 nodes);
    always within ``memory_mib`` of weights (>= 1 node)."""
    if nodes:
        L = nodes
    else:
        L = min(MAX_NODES, max(MIN_NODES, -(-TARGET_BYTES // max(nbytes, 1))))
        L = min(L, max(2, int(FLOP_BUDGET // (2 * M * K * N))))
    return max(1, min(L, memory_mib * MIB // max(nbytes, 1)))


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    case: str
    K: int
    N: int
    M: int
    ms: dict  # kernel -> milliseconds per node (median session time / nodes)
    nodes: dict = field(default_factory=dict)  # kernel -> L
    runs: dict = field(default_factory=dict)  # kernel -> timed session runs
    session_ms: dict = field(default_factory=dict)  # kernel -> median session milliseconds
    weight_bytes: dict = field(default_factory=dict)  # kernel -> weight bytes of one node


def time_session(sess, feeds: dict, min_seconds: float) -> tuple[float, int]:
    """Median seconds of ``sess.run`` and the number of timed runs: a warm-up (3 runs, 1 for
    runs over 0.2 s), then at least 3 runs, 5 unless they take over 5 x ``min_seconds``, and
    more until ``min_seconds`` have passed (1000 at most)."""
    t = time.perf_counter()
    sess.run(None, feeds)
    if time.perf_counter() - t < 0.2:
        for _ in range(2):
            sess.run(None, feeds)
    runs = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if len(runs) >= 1000 or (len(runs) >= 3 and spent >= min_seconds
                                 and (len(runs) >= 5 or spent >= 5 * min_seconds)):
            break
    return statistics.median(runs), len(runs)


def run(shapes: list[tuple[int, int]], ms: list[int], *, threads: int = 0, rank: int = 128,
        group: int = 128, group_a: int | None = None, min_seconds: float = 0.5,
        progress: bool = True, nodes: int = 0, memory_mib: int = DEFAULT_MEMORY_MIB,
        kernels: tuple[str, ...] | list[str] = KERNELS) -> list[Timing]:
    """Time ``kernels`` on every (shape, M). ``group``: SerqMatMul weight groups; ``group_a``:
    activation groups of both SerqMatMul schemes, None for each scheme's conversion default;
    ``nodes``: L of every case model (0: automatic, see :func:`nodes_for`)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(0)
    table = {}
    bar = tqdm(total=len(shapes) * len(kernels), desc="bench", disable=not progress)
    for K, N in shapes:
        if K < 2 or N < 1 or any(M < 1 for M in ms):
            raise SerqError(f"bad shape K={K} N={N} M={ms}")
        w = (rng.standard_normal((K, N), dtype=np.float32) / np.float32(np.sqrt(K)))
        acts = {M: rng.standard_normal((M, K), dtype=np.float32) for M in ms}
        for M in ms:
            table[K, N, M] = Timing(f"{K}x{N}", K, N, M, {})
        for kernel in kernels:
            bar.set_postfix_str(f"{K}x{N} {kernel}")
            layer = make_layer(kernel, w, rank=rank, group=group, group_a=group_a)
            per_m = {M: nodes_for(layer.nbytes, M, K, N, nodes=nodes, memory_mib=memory_mib)
                     for M in ms}
            chain = Chain(layer, max(per_m.values()))
            for M in ms:
                L = per_m[M]
                sess = chain.session(L, threads=threads)
                median, count = time_session(sess, {"A": acts[M]}, min_seconds)
                del sess
                t = table[K, N, M]
                t.ms[kernel] = median * 1e3 / L
                t.session_ms[kernel] = median * 1e3
                t.nodes[kernel], t.runs[kernel] = L, count
                t.weight_bytes[kernel] = layer.nbytes
            del chain, layer
            bar.update()
    bar.close()
    return [table[K, N, M] for K, N in shapes for M in ms]


# --------------------------------------------------------------------------- reports


RATIOS = [(base, ours) for ours in SERQ for base in ("fp32", "NB", "i8")]


def ratios(t: Timing) -> dict:
    """``"fp32/w4a8"`` etc.: baseline ms / SerqMatMul ms (> 1: SerqMatMul faster); ``NB`` is the
    fastest MatMulNBits variant, ``i8`` onnxruntime's dynamic int8. Missing kernels: absent."""
    base = {"fp32": t.ms.get(FLOAT), "i8": t.ms.get(DYNAMIC_INT8),
            "NB": min((t.ms[k] for k in NBITS if k in t.ms), default=None)}
    out = {}
    for b, ours in RATIOS:
        if base[b] is not None and ours in t.ms:
            out[f"{b}/{SHORT[ours]}"] = base[b] / t.ms[ours]
    return out


def _ms(v: float) -> str:
    """4 to 5 significant digits in at most 8 characters (up to 99999 ms)."""
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.4f}"


def _nodes_range(t: Timing) -> str:
    lo, hi = min(t.nodes.values(), default=0), max(t.nodes.values(), default=0)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def format_table(results: list[Timing]) -> str:
    kernels = [k for k in KERNELS if k in results[0].ms] + [
        k for k in results[0].ms if k not in KERNELS]
    rnames = list(ratios(results[0]))
    head = (f"{'K x N':>11} {'M':>4} {'L':>5} " + " ".join(f"{SHORT.get(k, k):>8}" for k in kernels)
            + " | " + " ".join(f"{r:>10}" for r in rnames))
    legend = ", ".join(f"{SHORT.get(k, k)} = {k}" for k in kernels)
    lines = ["times in ms per node (median session time / L nodes); ratios: baseline / "
             "SerqMatMul, > 1: SerqMatMul is faster; NB: the fastest MatMulNBits",
             legend, "MatMulNBits ... int8: accuracy_level 4; L: nodes per case model", head,
             "-" * len(head)]
    for r in results:
        rat = ratios(r)
        lines.append(f"{r.case:>11} {r.M:>4} {_nodes_range(r):>5} "
                     + " ".join(f"{_ms(r.ms[k]):>8}" for k in kernels)
                     + " | " + " ".join(f"{rat[n]:>10.2f}" for n in rnames))
    return "\n".join(lines)


def format_markdown(results: list[Timing], *, machine: str | None = None,
                    threads: int = 0) -> str:
    """A markdown section for ``models/RESULTS-cpu.md``."""
    kernels = [k for k in KERNELS if k in results[0].ms]
    rnames = list(ratios(results[0]))
    lines = [f"Machine: {machine or machine_name()}; {threads_line(threads)}.", "",
             "Times in ms per node (median session time of L independent nodes / L); ratios "
             "are baseline / SerqMatMul (> 1: SerqMatMul is faster), NB the fastest "
             "MatMulNBits, i8 onnxruntime's dynamic int8; `int8` MatMulNBits: "
             "accuracy_level 4.", "",
             "| K x N | M | L | " + " | ".join(kernels) + " | " + " | ".join(rnames) + " |",
             "|" + "---|" * (3 + len(kernels) + len(rnames))]
    for r in results:
        rat = ratios(r)
        lines.append(f"| {r.case} | {r.M} | {_nodes_range(r)} | "
                     + " | ".join(_ms(r.ms[k]) for k in kernels) + " | "
                     + " | ".join(f"{rat[n]:.2f}" for n in rnames) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_json(results: list[Timing], *, threads: int = 0, settings: dict | None = None) -> dict:
    import onnxruntime as ort

    return {"machine": machine_name(), "onnxruntime": ort.__version__, "threads": threads,
            "settings": settings or {}, "kernels": [k for k in KERNELS if k in results[0].ms],
            "results": [dict(asdict(r), ratios=ratios(r)) for r in results]}


def write_json(path: str | os.PathLike, results: list[Timing], **kw) -> None:
    data = to_json(results, **kw)
    _atomic_write(Path(path), lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SerqError("--plot needs matplotlib: pip install 'serq-onnx[bench]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: str | os.PathLike, results: list[Timing], *, title: str = "") -> None:
    """Speed-up over float MatMul against M, one panel per shape, one line per kernel."""
    plt = _pyplot()
    from matplotlib import ticker

    cases = list(dict.fromkeys(r.case for r in results))
    kernels = [k for k in KERNELS if k in results[0].ms and k != FLOAT]
    cols = min(4, len(cases))
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False,
                             sharey=True)
    for ax, case in zip(axes.flat, cases):
        rs = [r for r in results if r.case == case]
        x = [r.M for r in rs]
        for k in kernels:
            style = "-" if k in SERQ else "--"
            ax.plot(x, [r.ms[FLOAT] / r.ms[k] for r in rs], style, marker="o", ms=3, label=k,
                    lw=2 if k in SERQ else 1)
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"K x N = {case}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(cases):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("speed-up vs float MatMul")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title or machine_name(), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * (2 if len(labels) > 4 else 1) / rows, 1, 0.95))
    _atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- arguments


def check_args(ms: list[int], *, threads: int, rank: int, group: int, group_a: int | None,
               min_seconds: float, nodes: int = 0, memory_mib: int = DEFAULT_MEMORY_MIB,
               suite: str | None = None, json_path=None, plot_path=None) -> None:
    """Refuse settings the kernels would reject, before any work starts."""
    if group < 16 or group & (group - 1):
        raise SerqError(f"--group must be a power of two >= 16 (SerqMatMul weight groups), "
                        f"got {group}")
    if group_a is not None:
        try:
            reference.check_groups(group, group_a)
        except reference.ContractError as e:
            raise SerqError(f"--group-a: {e}") from None
    if rank < 0:
        raise SerqError(f"--rank must be >= 0, got {rank}")
    if threads < 0:
        raise SerqError(f"--threads must be >= 0 (0: onnxruntime's default), got {threads}")
    if not min_seconds > 0:
        raise SerqError(f"--seconds must be > 0, got {min_seconds}")
    if not ms or any(m < 1 for m in ms):
        raise SerqError(f"--m takes token counts >= 1, got {','.join(map(str, ms))}")
    if not 0 <= nodes <= 4096:
        raise SerqError(f"--nodes must be in 0..4096 (0: automatic), got {nodes}")
    if memory_mib < 1:
        raise SerqError(f"--memory-mib must be >= 1, got {memory_mib}")
    if suite is not None and suite not in SUITES:
        raise SerqError(f"--suite takes one of {', '.join(SUITES)}, got {suite!r}")
    for flag, path, suffix in (("--json", json_path, None), ("--plot", plot_path, ".png")):
        if path is None:
            continue
        path = Path(path)
        if suffix and path.suffix.lower() != suffix:
            raise SerqError(f"{flag} takes a {suffix} path, got {path}")
        if path.is_dir():
            raise SerqError(f"{flag} {path} is a folder")
        if not path.parent.resolve().is_dir():
            raise SerqError(f"{flag}: folder {path.parent} does not exist")
    if plot_path is not None:
        _pyplot()


def shapes_of_model(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Distinct (K, N) of the float linear layers of an ONNX model."""
    if not os.path.isfile(path):
        raise SerqError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises several types for a corrupt or truncated file
        raise SerqError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shapes = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(inits.get(n.input[1], ())) == 2:
            s = inits[n.input[1]]
            if s not in shapes and "lm_head" not in n.name:
                shapes.append(s)
    if not shapes:
        raise SerqError(f"{path} has no MatMul with a 2-D weight initializer")
    return [(int(k), int(n)) for k, n in shapes]
