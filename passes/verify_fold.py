"""Check that the folded float graph still computes the original model.

Folding and permuting are exact in real arithmetic; only float rounding may differ. A relative
RMS difference above ``tolerance`` means a fold was wrong, and conversion stops.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from serq_onnx import compare
from serq_onnx.errors import SerqError
from serq_onnx.modelio import save_for_session


class VerifyFoldPass(ir.passes.InPlacePass):
    def __init__(self, original: str | os.PathLike, sequences: Sequence[np.ndarray],
                 tolerance: float = 1e-4, prepack: bool = True):
        super().__init__()
        self.prepack = prepack  # compare.session_options
        self.original = original
        self.sequences = sequences
        self.tolerance = tolerance
        self.result: compare.LogitDiff | None = None

    def requires(self, model: ir.Model) -> None:
        """The original model file to compare with and at least one check sequence."""
        if not Path(self.original).is_file():
            raise ir.passes.PreconditionError(f"VerifyFoldPass: the original model "
                                              f"{self.original} is not a file")
        if not self.sequences:
            raise ir.passes.PreconditionError("VerifyFoldPass: no check sequences")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # One float session at a time: two at once would hold the float weights twice over.
        b = compare.session_logits(compare.cpu_session(self.original, prepack=self.prepack),
                                   self.sequences)
        with tempfile.TemporaryDirectory(prefix="serq-fold-") as tmp:
            path = Path(tmp) / "folded.onnx"
            save_for_session(model, path)
            a = compare.session_logits(compare.cpu_session(path, prepack=self.prepack),
                                       self.sequences)
        self.result = compare.diff(a, b)
        if not self.result.rel_rms <= self.tolerance:
            raise SerqError(f"folding the flattening scales changed the float model "
                            f"({self.result}); this graph pattern is not handled exactly -- "
                            "please report it with the model")
        return ir.passes.PassResult(model, modified=False)
