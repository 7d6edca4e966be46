"""Static activation flattening and saliency order, folded into producers where exact.

For a group with per-channel absmax ``s`` the layers must see ``X^ = (X / s)[..., pi]`` with
``pi = argsort(s, descending)``. Where the producer allows it the division is folded into a
float initializer (RMSNorm's gamma; the up projection's columns), and the permutation into the
gate and up columns; whatever cannot be folded becomes a run-time ``Gather``/``Mul`` in front of
the layers, which ``ReplaceMatMulPass`` later absorbs into ``SerqMatMul``'s ``act_perm`` and
``act_scale`` inputs. The graph stays a float graph that computes the original function, which
``VerifyFoldPass`` checks.

The SmoothQuant baseline (``method="smoothquant"``) reuses the same folds with its own scales
``s_j = max|X_j|^alpha / max_n |W_jn|^(1-alpha)`` and the identity order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx.plan import (
    ConvertConfig,
    InputGroup,
    cast_checked,
    initializer_array,
)

from ._base import PlanPass
from .find_targets import constant_of

RUNTIME_KEY = "serq.runtime"


def flatten_scales(absmax: np.ndarray, floor: float) -> np.ndarray:
    """``s`` with a floor relative to its maximum, so no channel divides by ~0."""
    a = np.asarray(absmax, np.float32)
    top = float(a.max()) if a.size else 1.0
    return np.maximum(a, np.float32(floor * top if top > 0 else 1.0)).astype(np.float32)


def saliency_order(s: np.ndarray) -> np.ndarray:
    return np.argsort(-s, kind="stable").astype(np.int64)


def smooth_scales(absmax: np.ndarray, wmax: np.ndarray, alpha: float,
                  floor: float) -> np.ndarray:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel.

    ``wmax`` is each input channel's max |w| over every weight reading the input; it is floored
    like ``s`` (so an all-zero row does not divide by 0), the powers are taken in float64 and the
    result is floored with :func:`flatten_scales`.
    """
    w = flatten_scales(wmax, floor).astype(np.float64)
    a = np.asarray(absmax, np.float32).astype(np.float64)
    return flatten_scales(a ** alpha / w ** (1.0 - alpha), floor)


def group_scales(group: InputGroup, config: ConvertConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(s, perm)`` of a group: SERQ's absmax and saliency order, or SmoothQuant's scales."""
    if group.absmax is None:
        raise RuntimeError("FoldFlatteningPass needs calibration statistics")
    if config.method == "smoothquant":
        # Read before any fold or permutation touches the weights: the original rows.
        wmax = np.max([np.abs(initializer_array(t.weight)).max(axis=1) for t in group.targets],
                      axis=0)
        s = smooth_scales(group.absmax, wmax, config.smooth_alpha, config.scale_floor)
        return s, np.arange(group.K, dtype=np.int64)
    s = flatten_scales(group.absmax, config.scale_floor)
    return s, saliency_order(s)


def _only_used_by(value: ir.Value, nodes: set) -> bool:
    return {u.node for u in value.uses() if u.node.op_type not in ("Shape", "Size")} <= nodes


class FoldFlatteningPass(PlanPass):
    def requires(self, model: ir.Model) -> None:
        """Target layers found; if the method flattens, calibration statistics (absmax) of
        every group (CalibratePass)."""
        self.require_targets()
        if self.plan.config.flattens:
            missing = [g.name for g in self.plan.groups if g.absmax is None]
            self.precondition(not missing, f"no calibration statistics for "
                              f"{missing[0] if missing else ''}; run CalibratePass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.plan.config
        for group in self.plan.groups:
            K = group.K
            if not cfg.flattens:
                group.s = np.ones(K, np.float32)
                group.perm = np.arange(K, dtype=np.int64)
                continue
            group.s, group.perm = group_scales(group, cfg)
        # Column folds change the gate/up weights of *other* groups; row transforms of those
        # weights happen later (PermuteWeightsPass), and the two commute.
        for group in self.plan.groups:
            if cfg.flattens:
                self._fold(model.graph, group)
        return ir.passes.PassResult(model, modified=cfg.flattens)

    def _fold(self, graph: ir.Graph, group: InputGroup) -> None:
        inv = (np.float32(1) / group.s).astype(np.float32)
        static_scale = False
        static_perm = bool(np.array_equal(group.perm, np.arange(group.K)))  # nothing to apply
        if group.kind == "norm":
            # A fresh initializer per norm: gamma may be shared (deduplicated) with other norms.
            norm = group.value.producer()
            old = norm.inputs[group.gamma_index]
            gamma = initializer_array(constant_of(old))
            new = ir.Value(name=f"{old.name}.serq_flat.{group.name}",
                           const_value=ir.tensor((gamma.astype(np.float32) * inv).astype(gamma.dtype)))
            graph.register_initializer(new)
            norm.replace_input_with(group.gamma_index, new)
            static_scale = True
            group.folded.append("scale->gamma")
            if not static_perm:
                group.runtime_reason = ("permutation: the norm's input is the residual stream, "
                                        "shared with the rest of the model")
        elif group.kind == "mlp_act" and self._mlp_foldable(group):
            fold_into_gate_up(graph, group, inv)
            static_scale = static_perm = True
            group.folded += ["scale->up", "perm->gate,up"]
        elif group.kind == "mlp_act":
            group.runtime_reason = ("act(gate) * up: the gate or up output or weight is also "
                                    "used elsewhere")
        if static_perm and static_scale:
            return
        x = group.value
        new_nodes = []
        if not static_perm:
            perm = ir.Value(name=f"serq/{group.name}/act_perm", const_value=ir.tensor(group.perm))
            graph.register_initializer(perm)
            node = ir.node("Gather", [x, perm], attributes={"axis": -1},
                           name=f"serq/{group.name}/Gather",
                           outputs=[ir.Value(name=f"serq/{group.name}/permuted")])
            node.metadata_props[RUNTIME_KEY] = "perm"
            new_nodes.append(node)
            x = node.outputs[0]
        if not static_scale:
            # In the activations' dtype (the weights'), so the float graph stays valid;
            # ReplaceMatMulPass hands it to the op as float32.
            dtype = initializer_array(group.targets[0].weight).dtype
            sc = ir.Value(name=f"serq/{group.name}/act_scale",
                          const_value=ir.tensor(inv[group.perm].astype(dtype)))
            graph.register_initializer(sc)
            node = ir.node("Mul", [x, sc], name=f"serq/{group.name}/Mul",
                           outputs=[ir.Value(name=f"serq/{group.name}/scaled")])
            node.metadata_props[RUNTIME_KEY] = "scale"
            new_nodes.append(node)
            x = node.outputs[0]
        first = min((t.node for t in group.targets), key=lambda n: list(graph).index(n))
        graph.insert_before(first, new_nodes)
        for t in group.targets:
            t.node.replace_input_with(0, x)

    @staticmethod
    def _mlp_foldable(group: InputGroup) -> bool:
        """Whether nothing but ``act(gate) * up`` reads the gate and up outputs and weights."""
        product = group.value.producer()
        inner = set(group.mlp_nodes) | {product}
        values = [group.up.node.outputs[0], group.gate.node.outputs[0]]
        values += [o for n in group.mlp_nodes for o in n.outputs]
        weights = {group.up.weight, group.gate.weight}
        return (all(_only_used_by(v, inner) for v in values)
                and all(len(w.uses()) == 1 for w in weights))


def fold_into_gate_up(graph: ir.Graph, group: InputGroup, inv: np.ndarray) -> None:
    """Divide up's columns by ``s`` and permute gate's and up's by ``perm``.

    With a fused gate_up projection (``gate_cols`` / ``up_cols`` set) only those column ranges
    of its one weight change, each permuted within itself: the Slices still cut the same ranges,
    so ``act(gate) * up`` comes out scaled and permuted as down's input must be. The folded
    weights are computed when read (:func:`set_lazily`), as the flattened ones are later.
    """
    def cols(w: np.ndarray, rng: tuple[int, int] | None) -> slice:
        return slice(0, w.shape[1]) if rng is None else slice(*rng)

    perm = group.perm
    if group.up is group.gate:
        def gate_up(w: np.ndarray) -> np.ndarray:
            g, u = cols(w, group.gate_cols), cols(w, group.up_cols)
            w[:, u] = (w[:, u] * inv[None, :])[:, perm]
            w[:, g] = w[:, g][:, perm]
            return w
        set_lazily(group.up.weight, gate_up)
        return

    def up(w: np.ndarray) -> np.ndarray:
        u = cols(w, group.up_cols)
        w[:, u] = (w[:, u] * inv[None, :])[:, perm]
        return w

    def gate(w: np.ndarray) -> np.ndarray:
        g = cols(w, group.gate_cols)
        w[:, g] = w[:, g][:, perm]
        return w

    set_lazily(group.up.weight, up)
    set_lazily(group.gate.weight, gate)


def set_lazily(value: ir.Value, fold) -> None:
    """Make ``value``'s initializer ``fold(copy of it)``, computed each time it is read from
    the original (memory-mapped for external data), so that no model's folded MLP weights are
    resident at once; ``fold`` works in place on a float copy in the weight's dtype, as an
    eager fold would. Where the dtype is not float32 the fold is computed once now, so that an
    overflow is reported here (:func:`~serq_onnx.plan.cast_checked`)."""
    src = value.const_value
    dtype = src.dtype.numpy()

    def folded() -> ir.TensorProtocol:
        w = fold(src.numpy().astype(np.float32))
        if isinstance(src, ir.ExternalTensor):
            src.release()
        return ir.tensor(np.ascontiguousarray(cast_checked(w, dtype, value.name,
                                                           "folded weight")), name=value.name)

    if dtype != np.float32:
        folded()
    value.const_value = ir.LazyTensor(folded, dtype=src.dtype, shape=ir.Shape(src.shape),
                                      name=value.name)
