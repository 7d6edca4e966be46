"""The L2QER baseline (Zhang et al., 2024): a two-factor low-rank correction of the weight error.

With the main weight ``Wq = Qw(W)`` (rank 0, no flattening), the quantization error
``E = W - deq(Wq)`` is scaled by the mean activation magnitude ``S = diag(a)``,
``a_j = mean_t |X_tj|``, and truncated by SVD: ``S E ~ U_r Sigma_r V_r^T``, giving
``A = S^-1 U_r Sigma_r`` (``[K, r]``) and ``B = V_r^T`` (``[r, N]``). Inference is
``Y = Qa(X) Wq + Q8(Qa(X) A) B``: both factors run as 8-bit-weight ``SerqMatMul`` nodes, the first
reading the same ``X`` (same activation bits), the second quantizing the intermediate ``X A`` to
8 bits -- the second GEMM and the extra quantization SERQ's single-factor ``R`` avoids.

``LowRankFactorsPass`` computes ``A`` and ``B`` while the float weights are still in the graph
(after the main weight is quantized); ``LowRankBranchPass`` adds the two nodes and the ``Add``
once ``ReplaceMatMulPass`` has made the main ``SerqMatMul``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from serq_onnx import reference
from serq_onnx.errors import SerqError
from serq_onnx.plan import Target, initializer_array

from ._base import PlanPass
from .fold_flattening import flatten_scales

LOWRANK_BITS = 8


def lowrank_factors(w: np.ndarray, w_deq: np.ndarray, absmean: np.ndarray, rank: int,
                    floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A [K, r], B [r, N])``, float64, from the activation-scaled SVD of ``W - w_deq``.

    ``absmean`` is floored like the flattening scales so that ``S^-1`` stays finite. Each singular
    pair's sign is fixed (the largest-magnitude entry of ``U``'s column is positive) so that the
    quantized factors do not depend on the SVD routine.
    """
    a = flatten_scales(absmean, floor).astype(np.float64)
    err = np.asarray(w, np.float32).astype(np.float64) - np.asarray(w_deq, np.float64)
    u, sig, vt = np.linalg.svd(a[:, None] * err, full_matrices=False)
    u, sig, vt = u[:, :rank], sig[:rank], vt[:rank]
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1
    u, vt = u * sign[None, :], vt * sign[:, None]
    return (u * sig[None, :]) / a[:, None], vt


def _weights_8bit(w: np.ndarray, group_w: int, group_a: int, bits_a: int
                  ) -> reference.SerqWeights:
    K, N = w.shape
    layout = reference.Layout(K=K, N=N, rank=0, group_w=group_w, group_a=group_a,
                              bits_w=LOWRANK_BITS, bits_a=bits_a)
    codes, scales = reference.quantize_weight(w, LOWRANK_BITS, group_w)
    return reference.assemble_weights(layout, codes, scales, np.zeros((0, N), np.int8),
                                      np.ones(N, np.float32))


class LowRankFactorsPass(PlanPass):
    """Set ``target.lowrank`` for every target; run after the main weight is quantized and
    before ``ReplaceMatMulPass`` (it reads the float weight initializer)."""

    def requires(self, model: ir.Model) -> None:
        """Calibration mean |x| of every group (CalibratePass, method l2qer); main weights
        quantized (QuantizeWeightsPass or GPTQPass); float MatMuls still in place."""
        self.require_targets()
        missing = [g.name for g in self.plan.groups if g.absmean is None]
        self.precondition(not missing, f"no calibration mean |x| for "
                          f"{missing[0] if missing else ''}; run CalibratePass with method "
                          "'l2qer' first")
        raw = [t.name for t in self.plan.targets if t.weights is None]
        self.precondition(not raw, f"{raw[0] if raw else ''} is not quantized; run "
                          "QuantizeWeightsPass or GPTQPass first")
        done = [t.name for t in self.plan.targets if t.node.op_type != "MatMul"]
        self.precondition(not done, f"{done[0] if done else ''} is no longer a float MatMul; "
                          "run before ReplaceMatMulPass")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.plan.config
        for group in self.plan.groups:
            if group.absmean is None:
                raise SerqError(f"L2QER needs the calibration mean |x| of {group.name}; "
                                "run CalibratePass with method 'l2qer'")
            for t in group.targets:
                if t.weights is None:
                    raise SerqError(f"{t.name}: quantize the main weight before L2QER")
                rank = min(cfg.rank, t.K, t.N, *([t.rank_cap] if t.rank_cap is not None else []))
                if rank == 0:
                    continue
                w_deq = reference.effective_weight(t.weights).astype(np.float32)
                t.lowrank = lowrank_factors(initializer_array(t.weight), w_deq, group.absmean,
                                            rank, cfg.scale_floor)
        return ir.passes.PassResult(model, modified=False)


class LowRankBranchPass(PlanPass):
    """``Y = SerqMatMul(X; Wq) + SerqMatMul(SerqMatMul(X; A), B)`` for every target with
    ``target.lowrank``; run after ``ReplaceMatMulPass``."""

    def requires(self, model: ir.Model) -> None:
        """Every target with low-rank factors (LowRankFactorsPass) already a SerqMatMul
        (ReplaceMatMulPass)."""
        raw = [t.name for t in self.plan.targets
               if t.lowrank is not None and t.node.op_type != reference.OP_TYPE]
        self.precondition(not raw, f"{raw[0] if raw else ''} is still a float MatMul; run "
                          "ReplaceMatMulPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for t in self.plan.targets:
            if t.lowrank is not None:
                self._branch(model.graph, t)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _serq_node(self, graph: ir.Graph, x: ir.Value, wts: reference.SerqWeights,
                   prefix: str) -> ir.Node:
        inits = []
        for key, arr in wts.initializers().items():
            v = ir.Value(name=f"{prefix}.serq_{key}", const_value=ir.tensor(arr))
            graph.register_initializer(v)
            inits.append(v)
        return ir.node(reference.OP_TYPE, [x, *inits], attributes=wts.layout.attributes("int"),
                       domain=reference.DOMAIN, version=reference.OP_VERSION,
                       name=f"{prefix}/SerqMatMul", outputs=[ir.Value(name=f"{prefix}/out")])

    def _branch(self, graph: ir.Graph, t: Target) -> None:
        cfg = self.plan.config
        main = t.node
        if main.op_type != reference.OP_TYPE or len(main.inputs) > 4:
            raise SerqError(f"{t.name}: the L2QER branch expects a plain SerqMatMul main node")
        a, b = t.lowrank
        x = main.inputs[0]
        prefix = f"serq/{t.name}/lowrank"
        node_a = self._serq_node(graph, x, _weights_8bit(a, cfg.group_w, cfg.group_a,
                                                         cfg.bits_a), f"{prefix}/A")
        node_b = self._serq_node(graph, node_a.outputs[0],
                                 _weights_8bit(b, cfg.group_w, cfg.group_a, LOWRANK_BITS),
                                 f"{prefix}/B")
        old_out = main.outputs[0]
        out = ir.Value(name=f"{prefix}/sum", shape=old_out.shape, type=old_out.type)
        ir.convenience.replace_all_uses_with(old_out, out)
        add = ir.node("Add", [old_out, node_b.outputs[0]], name=f"{prefix}/Add", outputs=[out])
        graph.insert_after(main, [node_a, node_b, add])
        out_name = old_out.name
        old_out.name = f"{prefix}/main"
        out.name = out_name
        t.lowrank = None  # the float factors are no longer needed
