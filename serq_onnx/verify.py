"""The checks a converted model must pass before it is written.

Two checks, because they catch different failures:

* **Ops against the reference.** Every ``SerqMatMul`` of the converted model is run on the
  model's own activations (a few calibration tokens) and compared with
  :func:`serq_onnx.reference.serq_matmul` within the float32 rounding bound of its sum. This is
  tight: a wrong activation code, a dropped block or a misread nibble is far above it. It is what
  makes a kernel bug a failed conversion rather than a quietly worse model.
* **Logits against the float model.** Quantization changes the logits; a bound per scheme
  (:data:`LOGIT_BOUNDS`) fails the conversion when the change is so large that the model is
  broken rather than quantized.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import compare, reference
from .errors import SerqError
from .evaluate import causal_lm_spec
from .modelio import save_for_session


@dataclass(frozen=True)
class LogitBound:
    """Largest relative RMS logit difference and smallest top-1 agreement accepted."""

    rel_rms: float
    top1: float

    def __str__(self) -> str:
        return f"relative rms <= {self.rel_rms:g}, top-1 agreement >= {self.top1:.0%}"


# Measured on SmolLM2-135M (calibration 8 x 256 tokens of Emma, 2 x 128 check tokens):
#   SERQ w4a8 0.10 / 84%, SERQ w4a4 0.31 / 69%; the weakest baseline, round to nearest,
#   w4a8 0.63 / 54% and w4a4 0.82 / 51%; a kernel that misread 4-bit weights 1.5 / 2%.
# A relative RMS of 1 means an error as large as the logits themselves: no model left. The
# bounds pass every method at both schemes with a margin and fail a broken model.
LOGIT_BOUNDS = {
    "w4a8": LogitBound(rel_rms=0.8, top1=0.40),
    "w4a4": LogitBound(rel_rms=1.0, top1=0.30),
}

# Tokens for the op check: enough rows to exercise several row tiles of the kernel.
OP_CHECK_TOKENS = 32


@dataclass
class OpCheck:
    nodes: int
    worst_ratio: float  # max |op - reference| / tolerance over all nodes and outputs
    worst_node: str
    dtypes: tuple[str, ...] = ()  # the activation dtypes the nodes saw

    def __str__(self) -> str:
        return (f"{self.nodes} SerqMatMul nodes equal the reference on {'/'.join(self.dtypes)} "
                f"activations (worst error {self.worst_ratio:.2g} of the tolerance, "
                f"{self.worst_node})")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is None:
        raise SerqError(f"SerqMatMul input {value.name} is not an initializer")
    return value.const_value.numpy()


def op_tolerance(A: np.ndarray, B, scales, act_scale, act_perm, layout: reference.Layout,
                 out_dtype) -> np.ndarray:
    """Bound on |kernel - exact| per output: float32 accumulation over the active blocks of
    terms whose magnitudes sum to ``sum_k |deq_a[k] * w[n, k]|`` (each block product rounds
    once, the running sum once per block), plus the rounding of the output dtype."""
    L = layout
    x = reference.prepare_activations(np.asarray(A).reshape(-1, L.K), act_scale, act_perm)
    q, sa, za = reference.quantize_activations(x, L.bits_a, L.group_a)
    xd = np.abs(np.nan_to_num(reference.dequantize_activations(q, sa, za, L.group_a)))
    x_ext = np.zeros((xd.shape[0], L.K_ext))
    x_ext[:, : L.K] = xd
    x_ext[:, L.K_pad: L.K_pad + L.rank] = xd[:, : L.rank]
    codes = np.abs(reference.unpack_weight_codes(B, L.bits_w).astype(np.float64))
    w = codes * np.repeat(scales.astype(np.float64), L.group_w, axis=1)
    scale = x_ext @ w.T
    blocks = -(-L.K // L.block) + -(-L.rank // L.block)
    eps_out = float(np.finfo(out_dtype).eps)
    tol = scale * (4 * (blocks + 2) * 2.0**-24) + scale * eps_out + 1e-30
    return tol.reshape(np.shape(A)[:-1] + (L.N,))


def check_ops(model: ir.Model, ids: np.ndarray) -> OpCheck:
    """Run ``model`` on ``ids`` with every SerqMatMul's input and output exposed, and compare
    each node with the reference on exactly the activations it saw."""
    graph = model.graph
    nodes = [n for n in graph if n.op_type == reference.OP_TYPE and n.domain == reference.DOMAIN]
    if not nodes:
        raise SerqError("the converted model has no SerqMatMul node")
    added: list[ir.Value] = []
    for n in nodes:
        for v in (n.inputs[0], n.outputs[0]):
            if v not in graph.outputs and v not in added:
                if v.type is None:  # A has Y's float type; a graph output must declare one
                    v.type = n.outputs[0].type
                added.append(v)
    graph.outputs.extend(added)
    try:
        with tempfile.TemporaryDirectory(prefix="serq-opcheck-") as tmp:
            path = Path(tmp) / "probe.onnx"
            save_for_session(model, path)
            sess = compare.cpu_session(path, with_ops=True)
            names = [o.name for o in sess.get_outputs()]
            from .evaluate import causal_lm_spec, prefill_feed

            feed = prefill_feed(causal_lm_spec(sess), np.asarray(ids, np.int64).reshape(-1))
            values = dict(zip(names, sess.run(names, feed)))
            del sess
    finally:
        for v in added:
            graph.outputs.remove(v)

    worst, worst_node, dtypes = 0.0, "", set()
    for n in nodes:
        attrs = {k: (a.as_string() if k == "scheme" else a.as_int()) for k, a in n.attributes.items()}
        L = reference.Layout(K=attrs["K"], N=attrs["N"], rank=attrs["rank"],
                             group_w=attrs["group_w"], group_a=attrs["group_a"],
                             bits_w=attrs["bits_w"], bits_a=attrs["bits_a"])
        ins = list(n.inputs) + [None] * (7 - len(n.inputs))
        B, scales, wsum, act_scale, act_perm, bias = (_const(v) for v in ins[1:7])
        A, Y = values[n.inputs[0].name], values[n.outputs[0].name]
        dtypes.add(str(A.dtype))
        exact = reference.serq_matmul(A.astype(np.float64), B, scales, wsum, act_scale, act_perm,
                                      bias, **L.attributes(attrs.get("scheme", "int")))
        tol = op_tolerance(A, B, scales, act_scale, act_perm, L, Y.dtype)
        nan_ref = np.isnan(exact)
        if not np.array_equal(np.isnan(Y), nan_ref):
            raise SerqError(f"SerqMatMul node {n.name} gives NaN where the reference does not "
                            "(or the reverse): the op library does not compute the op's contract; "
                            "please report it (--no-verify skips this check)")
        ratio = float((np.abs(Y.astype(np.float64) - exact)[~nan_ref] / tol[~nan_ref]).max(initial=0))
        if ratio > worst:
            worst, worst_node = ratio, n.name
        if ratio > 1:
            raise SerqError(f"SerqMatMul node {n.name} differs from the reference by {ratio:.3g}x "
                            f"its rounding tolerance (K={L.K}, N={L.N}, rank={L.rank}, group_w="
                            f"{L.group_w}, group_a={L.group_a}, bits_a={L.bits_a}): the op library "
                            "computes wrong results for this layout; please report it "
                            "(--no-verify writes the model anyway)")
    return OpCheck(nodes=len(nodes), worst_ratio=worst, worst_node=worst_node,
                   dtypes=tuple(sorted(dtypes)))


def check_logits(float_model: str | os.PathLike, converted: str | os.PathLike,
                 sequences: list[np.ndarray], scheme: str, prepack: bool = True
                 ) -> compare.LogitDiff:
    """Compare the logits of the two models on ``sequences``; fail beyond the scheme's bound.
    ``prepack``: the float session's (compare.session_options)."""
    # One session at a time, the float one freed before the converted one is built.
    ref = compare.session_logits(compare.cpu_session(float_model, prepack=prepack), sequences)
    d = compare.diff(compare.session_logits(compare.cpu_session(converted, with_ops=True),
                                            sequences), ref)
    bound = LOGIT_BOUNDS[scheme]
    if not np.isfinite(d.max_abs):
        raise SerqError(f"the converted model produces non-finite logits ({d}); nothing was "
                        "written (--no-verify writes it anyway)")
    if not (d.rel_rms <= bound.rel_rms and d.top1_agree >= bound.top1):
        raise SerqError(f"the converted model is too far from the float model ({d}; the bound for "
                        f"{scheme} is {bound}); nothing was written. Calibrate on real text "
                        "(--calib), use smaller activation groups (--group-a) or --scheme w4a8; "
                        "--no-verify writes it anyway")
    return d


# Fused attention against the original float graph: the same function up to float rounding
# (measured on SmolLM2: 2e-6 of the largest logit, float32).
ATTENTION_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


@dataclass(frozen=True)
class AttentionCheck:
    """Largest logit difference relative to the largest logit, over a left-padded batch of two
    (prefill and ``steps`` decode steps), and whether every greedy token agreed."""

    rel_max: float
    tokens_equal: bool
    steps: int

    def __str__(self) -> str:
        return (f"max |diff| {self.rel_max:.2g} of the largest logit, greedy tokens "
                f"{'equal' if self.tokens_equal else 'DIFFERENT'} (left-padded batch of 2, "
                f"prefill + {self.steps} decode steps)")


def _padded_run(session, vocab: int, steps: int) -> list[np.ndarray]:
    """Logits of a left-padded batch (row 0 has 3 pads), prefill then ``steps`` greedy steps,
    with padded positions zeroed; the inputs an Optimum export takes."""
    spec = causal_lm_spec(session)
    outputs = ["logits"] + [present for _, present in spec.past]
    dt = spec.input_dtypes
    rng = np.random.default_rng(0)
    B, S, P = 2, 12, 3
    ids = rng.integers(0, vocab, (B, S)).astype(dt["input_ids"])
    mask = np.ones((B, S), dt["attention_mask"])
    mask[0, :P] = 0
    pos = np.cumsum(mask, 1) - 1
    pos[mask == 0] = 1
    empty = np.zeros((B, spec.kv_heads, 0, spec.head_dim), spec.past_dtype)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            **{name: empty for name, _ in spec.past}}
    logits, *present = session.run(outputs, feed)
    res = [np.where(mask[..., None] == 1, logits.astype(np.float64), 0.0)]
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((B, 1), mask.dtype)], 1)
        feed = {"input_ids": logits[:, -1].argmax(-1)[:, None].astype(dt["input_ids"]),
                "attention_mask": mask, "position_ids": mask.sum(1, keepdims=True) - 1,
                **{name: v for (name, _), v in zip(spec.past, present)}}
        logits, *present = session.run(outputs, feed)
        res.append(logits.astype(np.float64))
    return res


def check_attention_fusion(original: str | os.PathLike, fused: ir.Model, vocab: int,
                           dtype: str = "float32", steps: int = 2, prepack: bool = True
                           ) -> AttentionCheck:
    """Run the original export and the graph with fused attention on the same left-padded
    batch; raise SerqError when they differ beyond :data:`ATTENTION_TOLERANCE`. ``prepack``:
    the sessions' (compare.session_options)."""
    ref = _padded_run(compare.cpu_session(original, prepack=prepack), vocab, steps)
    with tempfile.TemporaryDirectory(prefix="serq-attention-") as tmp:
        path = Path(tmp) / "fused.onnx"
        save_for_session(fused, path)
        got = _padded_run(compare.cpu_session(path, prepack=prepack), vocab, steps)
    scale = max(float(np.abs(r).max()) for r in ref) or 1.0
    rel = max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) / scale
    equal = all(bool((g[:, -1].argmax(-1) == r[:, -1].argmax(-1)).all()) for g, r in zip(got, ref))
    result = AttentionCheck(rel_max=rel, tokens_equal=equal, steps=steps)
    if not (rel <= ATTENTION_TOLERANCE[dtype] and equal):
        raise SerqError(f"fused attention changed the float model ({result})")
    return result
