"""Calibration: per-channel absmax of every target group's input, through onnxruntime.

Each group input gets ``ReduceMax(Abs(Reshape(x, [-1, K])), axis 0)`` as an extra graph output,
so a forward pass returns only ``[K]`` vectors per group and memory stays flat however many
calibration tokens are streamed through. For GPTQ each group input also gets its Gram matrix
``x^T x`` (``[K, K]`` float32 per sequence, from ``Transpose`` and ``MatMul`` in the graph),
summed over sequences in :data:`GRAM_DTYPE`. For L2QER each group input also gets the per-channel sum of
``|x|`` (``ReduceSum`` next to the ``ReduceMax``), from which the mean ``|x|`` over all tokens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from serq_onnx.errors import SerqError
from serq_onnx.evaluate import causal_lm_spec, prefill_feed
from serq_onnx.modelio import save_for_session
from serq_onnx.plan import Plan

from ._base import PlanPass

# The Gram matrices' running sum over sequences. Each sequence's [K, K] is already a float32
# sum over its tokens inside the graph; adding at most a few hundred of them in float32 more
# changes each entry by < n_seq * 2^-24 relative, far below GPTQ's 1% diagonal dampening. A
# float64 sum would add 8 bytes per entry to the 4 of the arrays each run returns: for a 0.5B
# Llama (24 layers of K = 1024, 1024, 1024, 4096) 3.8 GB on top of 1.9.
GRAM_DTYPE = np.float32


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))


def _gram_nodes(flat: ir.Value, K: int, prefix: str) -> tuple[list[ir.Node], ir.Value]:
    """``Transpose(x) @ x`` of the flattened ``[T, K]`` input (float32, as the model)."""
    xt = ir.node("Transpose", [flat], attributes={"perm": [1, 0]}, name=f"{prefix}/Transpose",
                 outputs=[ir.Value(name=f"{prefix}/flatT")])
    out = ir.Value(name=f"{prefix}/gram", shape=ir.Shape([K, K]),
                   type=ir.TensorType(ir.DataType.FLOAT))
    mm = ir.node("MatMul", [xt.outputs[0], flat], name=f"{prefix}/Gram", outputs=[out])
    return [xt, mm], out


def _abssum_nodes(absv: ir.Value, K: int, prefix: str, opset: int, axes: ir.Value | None
                  ) -> tuple[list[ir.Node], ir.Value]:
    """``ReduceSum(|x|, axis 0)`` of the flattened ``[T, K]`` input."""
    out = ir.Value(name=f"{prefix}/abssum", shape=ir.Shape([K]),
                   type=ir.TensorType(ir.DataType.FLOAT))
    if opset >= 13:
        node = ir.node("ReduceSum", [absv, axes], attributes={"keepdims": 0},
                       name=f"{prefix}/ReduceSum", outputs=[out])
    else:
        node = ir.node("ReduceSum", [absv], attributes={"keepdims": 0, "axes": [0]},
                       name=f"{prefix}/ReduceSum", outputs=[out])
    return [node], out


def _stat_nodes(value: ir.Value, K: int, index: int, opset: int, gram: bool,
                abssum: bool = False) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    prefix = f"serq_calib/{index}"
    shape = ir.Value(name=f"{prefix}/shape", const_value=ir.tensor(np.array([-1, K], np.int64)))
    reshape = ir.node("Reshape", [value, shape], name=f"{prefix}/Reshape",
                      outputs=[ir.Value(name=f"{prefix}/flat16")])
    # Statistics in float32 whatever the model's dtype: an FP16 Gram matrix or sum overflows.
    flat = ir.node("Cast", [reshape.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                   name=f"{prefix}/Cast", outputs=[ir.Value(name=f"{prefix}/flat")])
    absv = ir.node("Abs", [flat.outputs[0]], name=f"{prefix}/Abs",
                   outputs=[ir.Value(name=f"{prefix}/abs")])
    out = ir.Value(name=f"{prefix}/absmax", shape=ir.Shape([K]),
                   type=ir.TensorType(ir.DataType.FLOAT))
    if opset >= 18:
        axes = ir.Value(name=f"{prefix}/axes", const_value=ir.tensor(np.array([0], np.int64)))
        red = ir.node("ReduceMax", [absv.outputs[0], axes], attributes={"keepdims": 0},
                      name=f"{prefix}/ReduceMax", outputs=[out])
        inits = [shape, axes]
    else:
        red = ir.node("ReduceMax", [absv.outputs[0]], attributes={"keepdims": 0, "axes": [0]},
                      name=f"{prefix}/ReduceMax", outputs=[out])
        inits = [shape]
    nodes, outs = [reshape, flat, absv, red], [out]
    if abssum:
        sum_axes = None
        if opset >= 13:
            sum_axes = ir.Value(name=f"{prefix}/sum_axes",
                                const_value=ir.tensor(np.array([0], np.int64)))
            inits.append(sum_axes)
        s_nodes, s_out = _abssum_nodes(absv.outputs[0], K, prefix, opset, sum_axes)
        nodes += s_nodes
        outs.append(s_out)
    if gram:
        g_nodes, g_out = _gram_nodes(flat.outputs[0], K, prefix)
        nodes += g_nodes
        outs.append(g_out)
    return nodes, outs, inits


# (statistics model file, output names, sequences) -> each sequence's outputs, in order. Called
# while the file exists; it must have read what it needs by the time it returns.
StatRunner = Callable[[Path, list[str], Sequence[np.ndarray]], Iterator[list[np.ndarray]]]


def statistics_session(path: Path, names: list[str], threads: int = 0
                       ) -> Callable[[np.ndarray], list[np.ndarray]]:
    """One sequence -> its statistic outputs ``names``, from an onnxruntime session on the
    model at ``path`` (made now: the file may go once this returns). ``threads``: intra-op
    threads (0: onnxruntime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    spec = causal_lm_spec(sess)
    return lambda seq: sess.run(names, prefill_feed(spec, seq))


def run_statistics(path: Path, names: list[str], sequences: Sequence[np.ndarray]
                   ) -> Iterator[list[np.ndarray]]:
    """The default :data:`StatRunner`: every sequence in this process, in order."""
    run = statistics_session(path, names)
    return (run(seq) for seq in sequences)


class CalibratePass(PlanPass):
    """Set ``group.absmax`` for every group from the float model on ``sequences``.

    When the plan's config asks for GPTQ, also ``group.gram`` (:data:`GRAM_DTYPE` ``[K, K]``, the sum of
    ``x^T x`` over every calibration token, in the input's original channel order) and
    ``group.tokens``. For L2QER, also ``group.absmean`` (per-channel mean ``|x|``).
    ``runner`` runs the sequences elsewhere (``serq_onnx.distributed``); the sums are the same.
    """

    def __init__(self, plan: Plan, sequences: Sequence[np.ndarray], progress: bool = True,
                 runner: StatRunner | None = None):
        super().__init__(plan)
        self.sequences = sequences
        self.progress = progress
        self.runner = runner  # None: run_statistics, in this process

    def requires(self, model: ir.Model) -> None:
        """Target layers found (FindTargetsPass); their inputs are values of the float graph."""
        self.require_targets()
        live = set(model.graph.inputs) | {v for n in model.graph for v in n.outputs}
        lost = [g.name for g in self.plan.groups if g.value not in live]
        self.precondition(not lost, f"the input of {lost[0] if lost else ''} is no longer in "
                          "the graph; calibrate before any pass rewrites the graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.sequences:
            raise SerqError("no calibration sequences: give a longer --calib text or lower "
                            "--calib-seqlen")
        graph = model.graph
        opset = _opset(model)
        want_gram = self.plan.config.weight_quant == "gptq"
        want_abssum = self.plan.config.method == "l2qer"
        added_nodes, added_inits, stat_outputs = [], [], []
        for i, group in enumerate(self.plan.groups):
            nodes, outs, inits = _stat_nodes(group.value, group.K, i, opset, want_gram,
                                             want_abssum)
            added_nodes += nodes
            added_inits += inits
            stat_outputs += outs
        for v in added_inits:
            graph.register_initializer(v)
        graph.extend(added_nodes)
        graph.outputs.extend(stat_outputs)
        names = [v.name for v in stat_outputs]
        try:
            with tempfile.TemporaryDirectory(prefix="serq-calib-") as tmp:
                path = Path(tmp) / "calib.onnx"
                save_for_session(model, path)
                results = (self.runner or run_statistics)(path, names, self.sequences)
        finally:
            for _ in stat_outputs:
                graph.outputs.pop()
            graph.remove(added_nodes, safe=True)
            for v in added_inits:
                graph.initializers.pop(v.name)
        per_group = 1 + want_abssum + want_gram
        absmax = [np.zeros(g.K, np.float32) for g in self.plan.groups]
        grams = [np.zeros((g.K, g.K), GRAM_DTYPE) for g in self.plan.groups] if want_gram else []
        abssums = [np.zeros(g.K, np.float64) for g in self.plan.groups] if want_abssum else []
        tokens = 0
        # Summed in sequence order, whoever ran the sequences (``runner``): the same sums.
        for seq, outs in tqdm(zip(self.sequences, results), total=len(self.sequences),
                              desc="calibrating", unit="seq", disable=not self.progress):
            tokens += len(seq)
            for acc, o in zip(absmax, outs[::per_group]):
                np.maximum(acc, o, out=acc)
            for acc, o in zip(abssums, outs[1::per_group]):
                acc += o
            for acc, o in zip(grams, outs[1 + want_abssum::per_group]):
                acc += o
        for i, (group, a) in enumerate(zip(self.plan.groups, absmax)):
            if not np.all(np.isfinite(a)):
                raise SerqError(f"calibration saw NaN or infinite activations at {group.name}: "
                                "the float model itself overflows on this text")
            group.absmax = a
            if want_abssum:
                if not np.all(np.isfinite(abssums[i])):
                    raise SerqError(f"the calibration sum of |x| at {group.name} overflows "
                                    "float32; L2QER cannot be used on this model")
                group.absmean, group.tokens = abssums[i] / max(tokens, 1), tokens
            if want_gram:
                if not np.all(np.isfinite(grams[i])):
                    raise SerqError(f"the calibration Gram matrix of {group.name} overflows "
                                    "float32; GPTQ cannot be used on this model")
                group.gram, group.tokens = grams[i], tokens
        return ir.passes.PassResult(model, modified=False)
