"""Quantize each residual main weight (round to nearest, groups along K) and pack the op inputs.

Group scales are absmax or searched for the least rounding error (``config.weight_scale``);
``GPTQPass`` replaces this pass when ``config.weight_quant == "gptq"``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from serq_onnx import reference
from serq_onnx.packed_store import PackedStore
from serq_onnx.plan import ConvertConfig, Plan, Target

from ._base import PlanPass


def pack_target(t: Target, cfg: ConvertConfig, codes: np.ndarray, scales: np.ndarray,
                store: PackedStore | None = None) -> None:
    """Set ``t.weights`` from its main codes ``[K, N]`` and scales and its R, written to
    ``store`` where there is one; drop the float residual and R's codes."""
    bits_w, bits_a = t.layer_bits(cfg)
    layout = reference.Layout(K=t.K, N=t.N, rank=t.r_codes.shape[0], group_w=cfg.group_w,
                              group_a=cfg.group_a, bits_w=bits_w, bits_a=bits_a)
    w = reference.assemble_weights(layout, codes, scales, t.r_codes, t.r_scale)
    if store is not None:
        w = replace(w, B=store.put(w.B), scales=store.put(w.scales), wsum=store.put(w.wsum))
    t.weights = w
    t.residual = t.w_hat = t.r_codes = t.r_scale = None


def require_residuals(p: PlanPass) -> None:
    """Every target has its R and residual main weight (SalientReconstructionPass ran)."""
    p.require_targets()
    missing = [t.name for t in p.plan.targets if t.residual is None or t.r_codes is None]
    p.precondition(not missing, f"{missing[0] if missing else ''} has no residual main weight; "
                   "run SalientReconstructionPass first")


class QuantizeWeightsPass(PlanPass):
    def __init__(self, plan: Plan, progress: bool = True):
        super().__init__(plan)
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        """R and the residual main weight of every target (SalientReconstructionPass)."""
        require_residuals(self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.plan.config
        for t in tqdm(self.plan.targets, desc="quantizing", unit="layer",
                      disable=not self.progress):
            codes, scales = reference.quantize_weight(t.residual_f32(), t.layer_bits(cfg)[0],
                                                      cfg.group_w, search=cfg.weight_scale == "mse")
            pack_target(t, cfg, codes, scales, self.plan.packed_store)
        return ir.passes.PassResult(model, modified=False)
