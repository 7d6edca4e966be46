"""Calibration: per-channel absmax of every target group's input, through onnxruntime.

Each group input gets ``ReduceMax(Abs(Reshape(x, [-1, K])), axis 0)`` as an extra graph output,
so a forward pass returns only ``[K]`` vectors per group and memory stays flat however many
calibration tokens are streamed through. For GPTQ each group input also gets its Gram matrix
``x^T x`` (``[K, K]`` float32 per sequence, from ``Transpose`` and ``MatMul`` in the graph),
summed over sequences in :data:`GRAM_DTYPE`. For L2QER each group input also gets the per-channel sum of
``|x|`` (``ReduceSum`` next to the ``ReduceMax``), from which the mean ``|x|`` over all tokens.

When the Gram matrices of all groups exceed ``ConvertConfig.gram_memory_mib``
(``serq_onnx.gram_chunks``), this pass collects the per-channel statistics only and leaves a
:class:`SavedFloatGraph` in the plan: the float graph as it is here, from which ``GPTQPass``
collects the Gram matrices chunk by chunk, each from a graph cut after the chunk's deepest
group. Every statistic is summed in sequence order by :func:`accumulate` in both cases.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from serq_onnx.compare import session_options
from serq_onnx.errors import SerqError
from serq_onnx.evaluate import causal_lm_spec, prefill_feed
from serq_onnx.graph_cut import add_carry_outputs, feed_from_cut, plan_cuts, values_by_name
from serq_onnx.modelio import save_for_session
from serq_onnx.plan import InputGroup, Plan

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


# (statistics model file, output names, sequences, *, prepack) -> each sequence's outputs, in
# order. Called while the file exists; it must have read what it needs by the time it returns.
# A sequence is its token ids, or the feed dict of a graph cut after an earlier pass; prepack:
# the sessions' (compare.session_options; False for ConvertConfig.low_memory).
StatRunner = Callable[..., Iterator[list[np.ndarray]]]


def statistics_session(path: Path, names: list[str], threads: int = 0, prepack: bool = True
                       ) -> Callable[[np.ndarray | dict], list[np.ndarray]]:
    """One sequence -> its statistic outputs ``names``, from an onnxruntime session on the
    model at ``path`` (made now: the file may go once this returns). ``threads``: intra-op
    threads (0: onnxruntime's default). The model may lack the logits and KV outputs (a graph
    cut after its last statistic); it is fed as the export it came from. A sequence given as a
    dict is the feed itself: the tensors an earlier pass handed on to a graph cut before
    (``serq_onnx.graph_cut``). ``prepack``: see :func:`serq_onnx.compare.session_options`."""
    import onnxruntime as ort

    so = session_options(prepack)
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if not any(i.name == "input_ids" for i in sess.get_inputs()):  # cut: fed dicts only
        return lambda feed: sess.run(names, feed)
    spec = causal_lm_spec(sess, need_outputs=False)
    return lambda seq: sess.run(names, seq if isinstance(seq, dict) else prefill_feed(spec, seq))


def run_statistics(path: Path, names: list[str], sequences: Sequence[np.ndarray], *,
                   prepack: bool = True) -> Iterator[list[np.ndarray]]:
    """The default :data:`StatRunner`: every sequence in this process, in order."""
    run = statistics_session(path, names, prepack=prepack)
    return (run(seq) for seq in sequences)


def accumulate(sequences: Sequence[np.ndarray], results: Iterable[list[np.ndarray]],
               ks: Sequence[int], absmax: bool, abssum: bool, gram: bool,
               progress: bool = True, desc: str = "calibrating"
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
    """Per-group ``(absmax, abssum, gram, tokens)`` from each sequence's outputs (per group of
    ``ks``: absmax, abssum, gram, each where asked), summed in sequence order whoever ran the
    sequences: the same float additions in the same order, so the same sums."""
    per_group = absmax + abssum + gram
    maxes = [np.zeros(K, np.float32) for K in ks] if absmax else []
    sums = [np.zeros(K, np.float64) for K in ks] if abssum else []
    grams = [np.zeros((K, K), GRAM_DTYPE) for K in ks] if gram else []
    tokens = 0
    it = iter(results)
    # No zip or tqdm around `results`: both would hold one sequence's outputs while the runner
    # makes the next one's, and with Gram matrices one set is as large as the sums.
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=not progress) as bar:
        for seq in sequences:
            outs = next(it, None)
            if outs is None:
                raise SerqError(f"the calibration runner returned no statistics for sequence "
                                f"{bar.n + 1} of {len(sequences)}")
            tokens += len(seq)
            for acc, o in zip(maxes, outs[::per_group]):
                np.maximum(acc, o, out=acc)
            for acc, o in zip(sums, outs[absmax::per_group]):
                acc += o
            for acc, o in zip(grams, outs[absmax + abssum::per_group]):
                acc += o
            o = outs = None  # freed before the next sequence's outputs are made
            bar.update(1)
    return maxes, sums, grams, tokens


def check_gram(group: InputGroup, gram: np.ndarray) -> None:
    if not np.all(np.isfinite(gram)):
        raise SerqError(f"the calibration Gram matrix of {group.name} overflows float32; GPTQ "
                        "cannot be used on this model")


class _CarriedFeeds(Sequence):
    """The tensors one pass handed on, per sequence, read from its folder when asked for."""

    def __init__(self, folder: Path, names: list[str], n: int):
        self.folder, self.names, self.n = folder, names, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        with np.load(self.folder / f"{i}.npz") as f:
            return {name: f[f"arr_{j}"] for j, name in enumerate(self.names)}


class SavedFloatGraph:
    """The float graph as calibration saw it, on disk until ``GPTQPass`` has collected the Gram
    matrices of every chunk (``chunks``: group indices, in graph order) from it.

    It owns a temporary folder: the graph with its weights as external data, written once
    (each statistics model is saved beside it and refers to that data, so a chunk costs no
    copy of the weights). :meth:`close` removes the folder; so do garbage collection and
    interpreter exit, whichever comes first. Statistics models keep only the statistic outputs
    and the nodes they need: the forward pass stops at the deepest group asked for (onnxruntime
    does not drop unused nodes itself). Chunks collected in order also start where the
    previous one stopped (``serq_onnx.graph_cut``): each hands on, in the folder, the tensors
    the next one reads, so the chunk passes together run the graph about once.
    """

    FILE = "float.onnx"

    def __init__(self, model: ir.Model, groups: Sequence[InputGroup],
                 sequences: Sequence[np.ndarray], chunks: list[list[int]],
                 runner: StatRunner | None = None, progress: bool = True, prepack: bool = True):
        self.names = [g.name for g in groups]
        self.values = [g.value.name for g in groups]
        self.ks = [g.K for g in groups]
        self.sequences, self.chunks = sequences, chunks
        self.runner, self.progress, self.prepack = runner, progress, prepack
        self.opset = _opset(model)
        self.models_built = 0
        self.cuts = plan_cuts(model, [[self.values[i] for i in chunk] for chunk in chunks])
        self.folder = Path(tempfile.mkdtemp(prefix="serq-grams-"))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        try:
            save_for_session(model, self.folder / self.FILE)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return not self._remove.alive

    def close(self) -> None:
        """Remove the saved graph (idempotent)."""
        self._remove()

    def collect(self, indices: Sequence[int], *, absmax: bool = False, abssum: bool = False,
                gram: bool = False, desc: str = "calibrating"
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
        """:func:`accumulate`'s sums for the groups ``indices`` over every sequence."""
        if self.closed:
            raise SerqError("the saved float graph was already removed; run CalibratePass "
                            "again before GPTQPass")
        c = self._chunk_of(indices)
        carry = self.cuts.carry[c] if c is not None else []
        fed = self._carried(c)
        items = self.sequences if fed is None else fed
        path, names = self._statistics_model(indices, absmax, abssum, gram, carry,
                                             fed[0] if fed is not None else None)
        try:
            results = (self.runner or run_statistics)(path, names, items, prepack=self.prepack)
        finally:
            path.unlink(missing_ok=True)
        n_stats = len(names) - len(carry)
        if carry:
            results = self._hand_on(results, n_stats, self._carry_dir(c + 1))
        sums = accumulate(self.sequences, results, [self.ks[i] for i in indices], absmax,
                          abssum, gram, self.progress, desc)
        if fed is not None:
            shutil.rmtree(fed.folder, ignore_errors=True)
        if carry:
            (self._carry_dir(c + 1) / "complete").touch()
        return sums

    def _chunk_of(self, indices: Sequence[int]) -> int | None:
        """Which chunk ``indices`` are, where the graph can be cut (else None)."""
        wanted = list(indices)
        return self.chunks.index(wanted) if self.cuts and wanted in self.chunks else None

    def _carry_dir(self, c: int) -> Path:
        return self.folder / f"carry-{c}"

    def _carried(self, c: int | None) -> _CarriedFeeds | None:
        """Chunk ``c``'s feeds, where the pass before it handed them on in full."""
        if not c or not (self._carry_dir(c) / "complete").is_file():
            return None
        return _CarriedFeeds(self._carry_dir(c), self.cuts.inputs[c], len(self.sequences))

    @staticmethod
    def _hand_on(results: Iterable[list[np.ndarray]], n_stats: int, folder: Path
                 ) -> Iterator[list[np.ndarray]]:
        """Each sequence's statistics, its tensors for the next pass saved in ``folder``."""
        folder.mkdir(exist_ok=True)
        i = 0
        for outs in results:  # (not enumerate: its tuple would hold the outputs, see accumulate)
            try:
                np.savez(folder / f"{i}.npz", *outs[n_stats:])
            except OSError as err:
                raise SerqError(f"cannot save the tensors one Gram pass hands on to the next in "
                                f"{folder} ({err.strerror or err}): free disk space there or "
                                "point TMPDIR at a larger disk") from None
            stats = outs[:n_stats]
            outs = None
            yield stats
            stats = None
            i += 1

    def grams(self, indices: Sequence[int], groups: Sequence[InputGroup], desc: str
              ) -> tuple[list[np.ndarray], int]:
        """The Gram sums of the groups ``indices`` (checked finite) and the tokens behind them."""
        _, _, grams, tokens = self.collect(indices, gram=True, desc=desc)
        for i, g in zip(indices, grams):
            check_gram(groups[i], g)
        return grams, tokens

    def _statistics_model(self, indices: Sequence[int], absmax: bool, abssum: bool,
                          gram: bool, carry: Sequence[str] = (),
                          fed: dict[str, np.ndarray] | None = None) -> tuple[Path, list[str]]:
        """The statistics model of the groups ``indices``, also handing on the tensors
        ``carry``; ``fed`` (one sequence's feeds): cut to start from those tensors."""
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        model = ir.load(self.folder / self.FILE)
        graph = model.graph
        values = values_by_name(graph)
        outputs: list[ir.Value] = []
        for i in indices:
            value = values.get(self.values[i])
            if value is None:
                raise SerqError(f"the input of {self.names[i]} ({self.values[i]!r}) is not in "
                                "the saved float graph; convert with a --gram-memory that holds "
                                "every Gram matrix")
            nodes, outs, inits = _stat_nodes(value, self.ks[i], i, self.opset, gram, abssum)
            for v in inits:
                graph.register_initializer(v)
            graph.extend(nodes)
            outputs += outs if absmax else outs[1:]  # outs: absmax[, abssum][, gram]
        outputs += add_carry_outputs(graph, carry)
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        if fed is not None:
            feed_from_cut(graph, fed)
        RemoveUnusedNodesPass()(model)
        self.models_built += 1
        path = self.folder / f"statistics-{self.models_built}.onnx"
        ir.save(model, path)  # its initializers still refer to FILE's data, beside it
        return path, [v.name for v in outputs]


class CalibratePass(PlanPass):
    """Set ``group.absmax`` for every group from the float model on ``sequences``.

    When the plan's config asks for GPTQ, also ``group.gram`` (:data:`GRAM_DTYPE` ``[K, K]``, the sum of
    ``x^T x`` over every calibration token, in the input's original channel order) and
    ``group.tokens``; where they exceed ``config.gram_memory_mib``, ``plan.gram_source`` (a
    :class:`SavedFloatGraph`) instead, and ``GPTQPass`` collects them. For L2QER, also
    ``group.absmean`` (per-channel mean ``|x|``). ``runner`` runs the sequences elsewhere
    (``serq_onnx.distributed``); the sums are the same. ``chunks`` (after the run): the
    group indices of each Gram collection, in order (none without GPTQ).
    """

    def __init__(self, plan: Plan, sequences: Sequence[np.ndarray], progress: bool = True,
                 runner: StatRunner | None = None):
        super().__init__(plan)
        self.sequences = sequences
        self.progress = progress
        self.runner = runner  # None: run_statistics, in this process
        self.chunks: list[list[int]] = []

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
        plan, groups = self.plan, self.plan.groups
        want_gram = plan.config.weight_quant == "gptq"
        want_abssum = plan.config.method == "l2qer"
        if plan.gram_source is not None:  # an earlier calibration's: superseded
            plan.gram_source.close()
            plan.gram_source = None
        self.chunks = plan.gram_chunks()
        source = None
        if len(self.chunks) > 1:
            source = SavedFloatGraph(model, groups, self.sequences, self.chunks, self.runner,
                                     self.progress, prepack=plan.prepack)
        try:
            if source is not None:
                absmax, abssums, grams, tokens = source.collect(
                    range(len(groups)), absmax=True, abssum=want_abssum)
            else:
                absmax, abssums, grams, tokens = self._collect_here(model, want_gram,
                                                                    want_abssum)
            self._store(absmax, abssums, grams, tokens, want_gram, want_abssum)
        except BaseException:
            if source is not None:
                source.close()
            raise
        plan.gram_source = source
        return ir.passes.PassResult(model, modified=False)

    def _collect_here(self, model: ir.Model, want_gram: bool, want_abssum: bool):
        """Every statistic in one run: the statistic nodes added to ``model`` as extra outputs
        for the run, saved, and taken out again."""
        graph = model.graph
        opset = _opset(model)
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
                results = (self.runner or run_statistics)(
                    path, names, self.sequences, prepack=self.plan.prepack)
        finally:
            for _ in stat_outputs:
                graph.outputs.pop()
            graph.remove(added_nodes, safe=True)
            for v in added_inits:
                graph.initializers.pop(v.name)
        return accumulate(self.sequences, results, [g.K for g in self.plan.groups], True,
                          want_abssum, want_gram, self.progress)

    def _store(self, absmax, abssums, grams, tokens: int, want_gram: bool,
               want_abssum: bool) -> None:
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
                if grams:  # else collected later, chunk by chunk (plan.gram_source)
                    check_gram(group, grams[i])
                    group.gram = grams[i]
                group.tokens = tokens
