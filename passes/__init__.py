"""Graph passes of the SERQ conversion, one per module, run in order by ``serq_onnx.converter``.

Each is an ``onnx_ir`` in-place pass over the model; the passes share a
:class:`serq_onnx.plan.Plan` (targets, calibration statistics, quantized weights).
"""

from .calibrate import CalibratePass
from .cleanup import CleanupPass
from .find_targets import FindTargetsPass
from .fold_flattening import FoldFlatteningPass
from .fuse_attention import FuseAttentionPass, RotaryParams
from .fuse_siblings import FuseSiblingsPass
from .gptq import GPTQPass
from .lowrank_branch import LowRankBranchPass, LowRankFactorsPass
from .permute_weights import PermuteWeightsPass
from .quantize import QuantizeWeightsPass
from .replace_matmul import ReplaceMatMulPass
from .salient import SalientReconstructionPass
from .untie_lm_head import UntieLMHeadPass
from .verify_fold import VerifyFoldPass

__all__ = [
    "CalibratePass",
    "CleanupPass",
    "FindTargetsPass",
    "FoldFlatteningPass",
    "FuseAttentionPass",
    "FuseSiblingsPass",
    "GPTQPass",
    "LowRankBranchPass",
    "LowRankFactorsPass",
    "PermuteWeightsPass",
    "QuantizeWeightsPass",
    "ReplaceMatMulPass",
    "RotaryParams",
    "SalientReconstructionPass",
    "UntieLMHeadPass",
    "VerifyFoldPass",
]
