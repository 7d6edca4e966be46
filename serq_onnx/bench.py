"""``serq-onnx bench``: SerqMatMul against onnxruntime's own kernels, same process, same shapes.

Each case is a one-node model run in its own session on the same input: float ``MatMul``
(MLAS sgemm), ``MatMulNBits`` (onnxruntime's 4-bit weight-only op; ``accuracy_level=4`` makes its
CPU kernel quantize activations to int8 too) and ``SerqMatMul`` w4a8 / w4a4. Ratios are
baseline time / SerqMatMul time, so > 1 means SerqMatMul is faster.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import reference
from .errors import SerqError

SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


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


def _model(node, inits, K: int, N: int, domain: str | None) -> bytes:
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])
    graph = helper.make_graph([node], "bench", [a], [y],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 18)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def float_matmul(w: np.ndarray) -> bytes:
    K, N = w.shape
    return _model(helper.make_node("MatMul", ["A", "W"], ["Y"]), {"W": w}, K, N, None)


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


def matmul_nbits(w: np.ndarray, block: int, accuracy_level: int) -> bytes:
    """A symmetric 4-bit ``MatMulNBits`` of ``w`` (values matter little for timing, but are real)."""
    K, N = w.shape
    packed, scales = nbits_weights(w, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=block, accuracy_level=accuracy_level)
    return _model(node, {"B": packed, "scales": scales}, K, N, "com.microsoft")


def serq_matmul(w: np.ndarray, *, bits_a: int, rank: int, group: int, group_a: int) -> bytes:
    K, N = w.shape
    layout = reference.Layout(K=K, N=N, rank=min(rank, K), group_w=group, group_a=group_a,
                              bits_w=4, bits_a=bits_a)
    wts = reference.build_serq_weights(w, layout)
    perm = np.random.default_rng(0).permutation(K).astype(np.int64)
    inputs = ["A", "B", "scales", "wsum", "", "act_perm"]
    node = helper.make_node(reference.OP_TYPE, inputs, ["Y"], domain=reference.DOMAIN,
                            **layout.attributes())
    return _model(node, {"B": wts.B, "scales": wts.scales, "wsum": wts.wsum, "act_perm": perm},
                  K, N, reference.DOMAIN)


@dataclass
class Timing:
    case: str
    K: int
    N: int
    M: int
    ms: dict  # kernel -> median milliseconds


def _time(sess, a: np.ndarray, min_seconds: float) -> float:
    for _ in range(3):
        sess.run(None, {"A": a})
    runs = []
    t_end = time.perf_counter() + min_seconds
    while len(runs) < 5 or (time.perf_counter() < t_end and len(runs) < 1000):
        t = time.perf_counter()
        sess.run(None, {"A": a})
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1e3


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def run(shapes: list[tuple[int, int]], ms: list[int], *, threads: int = 0, rank: int = 128,
        group: int = 128, group_a: int | None = None, min_seconds: float = 0.5,
        progress: bool = True) -> list[Timing]:
    """``group``: weight groups (and MatMulNBits blocks); ``group_a``: activation groups of
    both SerqMatMul schemes, None for each scheme's conversion default."""
    import onnxruntime as ort
    from tqdm.auto import tqdm

    from .library import get_library_path
    from .plan import DEFAULT_GROUP_A

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.register_custom_ops_library(get_library_path())
    rng = np.random.default_rng(0)
    out = []
    cases = [(K, N, M) for K, N in shapes for M in ms]
    for K, N, M in tqdm(cases, desc="bench", disable=not progress):
        if K < 2 or N < 1 or M < 1:
            raise SerqError(f"bad shape K={K} N={N} M={M}")
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        a = rng.standard_normal((M, K)).astype(np.float32)
        models = {
            "float MatMul": float_matmul(w),
            "MatMulNBits": matmul_nbits(w, group, 0),
            "MatMulNBits int8": matmul_nbits(w, group, 4),
            "SerqMatMul w4a8": serq_matmul(w, bits_a=8, rank=rank, group=group,
                                           group_a=_or(group_a, DEFAULT_GROUP_A["w4a8"])),
            "SerqMatMul w4a4": serq_matmul(w, bits_a=4, rank=rank, group=group,
                                           group_a=_or(group_a, DEFAULT_GROUP_A["w4a4"])),
        }
        timing = {}
        for name, model in models.items():
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            timing[name] = _time(sess, a, min_seconds)
        out.append(Timing(f"{K}x{N}", K, N, M, timing))
    return out


def format_table(results: list[Timing]) -> str:
    kernels = list(results[0].ms)
    head = f"{'K x N':>11} {'M':>5} " + " ".join(f"{k:>16}" for k in kernels)
    head += f" {'fp32/w4a8':>10} {'NBits-int8/w4a8':>16}"
    lines = ["times in ms (median); ratios > 1: SerqMatMul w4a8 is faster", head,
             "-" * len(head)]
    for r in results:
        ours = r.ms["SerqMatMul w4a8"]
        lines.append(f"{r.case:>11} {r.M:>5} " + " ".join(f"{r.ms[k]:>16.3f}" for k in kernels)
                     + f" {r.ms['float MatMul'] / ours:>10.2f}"
                     + f" {r.ms['MatMulNBits int8'] / ours:>16.2f}")
    return "\n".join(lines)


def check_args(ms: list[int], *, threads: int, rank: int, group: int, group_a: int | None,
               min_seconds: float) -> None:
    """Refuse settings the kernels would reject, before any work starts."""
    if group < 16 or group & (group - 1):
        raise SerqError(f"--group must be a power of two >= 16 (MatMulNBits blocks; SerqMatMul "
                        f"uses the same weight groups), got {group}")
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
