"""convert's checks can fail: the op check against the reference, the logit bounds, and what a
failed check leaves behind (nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serq_onnx import SerqError, reference, verify
from serq_onnx.converter import convert

SMALL = dict(rank=16, calib_samples=2, calib_seqlen=32, weight_quant="rtn", progress=False,
             log=lambda *a: None)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("group_w,group_a", [(128, 1), (6, 3), (10, 5), (32, 32)])
def test_odd_activation_blocks_convert_and_pass_the_op_check(tiny_llama, tmp_path, group_w,
                                                            group_a):
    """4-bit weights with odd blocks: the op used to misread them (an op check 8e4 times its
    tolerance); every layout the contract allows must pass it."""
    report = convert(tiny_llama.onnx_path, tmp_path / "out", group_w=group_w, group_a=group_a,
                     **SMALL)
    assert report.op_check.startswith(f"{report.serq_nodes} SerqMatMul nodes equal the "
                                      "reference on float32 activations")
    cfg = json.loads((tmp_path / "out" / "serq_config.json").read_text())
    assert cfg["op_check"] == report.op_check and cfg["verify"] == report.verify


def test_op_check_catches_one_wrong_activation_code(tiny_llama, tmp_path, monkeypatch):
    """A kernel that gets a single activation code wrong by one step, in one row of one node,
    is far outside the tolerance: the check fails and nothing is written."""
    exact = reference.serq_matmul
    calls = []

    def off_by_one_code(A, B, scales, wsum, act_scale=None, act_perm=None, bias=None, **attrs):
        y = exact(A, B, scales, wsum, act_scale, act_perm, bias, **attrs)
        if not calls:  # the first node only
            L = reference.Layout(**{k: v for k, v in attrs.items() if k != "scheme"})
            x = reference.prepare_activations(A.reshape(-1, L.K), act_scale, act_perm)
            _, sa, _ = reference.quantize_activations(x, L.bits_a, L.group_a)
            codes = reference.unpack_weight_codes(B, L.bits_w)
            k = int(np.argmax(np.abs(codes[0, : L.K])))  # channel k, column 0
            step = sa[0, k // (L.group_a or L.K)] * scales[0, k // L.group_w] * codes[0, k]
            y = y.copy()
            y.reshape(-1, L.N)[0, 0] += step
        calls.append(1)
        return y

    monkeypatch.setattr(verify.reference, "serq_matmul", off_by_one_code)
    with pytest.raises(SerqError, match="differs from the reference"):
        convert(tiny_llama.onnx_path, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_logit_bound_failure_writes_nothing_and_no_verify_writes(tiny_llama, tmp_path,
                                                                monkeypatch):
    monkeypatch.setitem(verify.LOGIT_BOUNDS, "w4a8", verify.LogitBound(rel_rms=1e-6, top1=1.0))
    with pytest.raises(SerqError, match="too far from the float model.*--no-verify"):
        convert(tiny_llama.onnx_path, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    report = convert(tiny_llama.onnx_path, tmp_path / "out", verify=False, **SMALL)
    assert report.verify.startswith("skipped") and report.op_check.startswith("skipped")
    assert (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
def test_real_conversions_are_inside_the_bounds_with_margin(tiny_llama, tmp_path, scheme):
    report = convert(tiny_llama.onnx_path, tmp_path / "out", scheme=scheme, **SMALL)
    bound = verify.LOGIT_BOUNDS[scheme]
    rel = float(report.verify.split("relative rms ")[1].split(",")[0])
    assert rel < bound.rel_rms / 2


def test_rank_beyond_k_is_recorded_per_layer(tiny_llama, tmp_path):
    """Hidden 64, intermediate 160: rank 100 applies as 64 to the layers with K = 64."""
    notes = []
    report = convert(tiny_llama.onnx_path, tmp_path / "out", **{**SMALL, "rank": 100,
                                                                  "log": notes.append})
    assert report.config["rank"] == 100
    assert report.ranks == {"64": 12, "100": 2, "0": 1}  # the int8 LM head takes no R
    assert any("--rank 100 exceeds K" in n for n in notes)
    cfg = json.loads((tmp_path / "out" / "serq_config.json").read_text())
    assert cfg["ranks"] == {"64": 12, "100": 2, "0": 1}


def test_rank_beyond_every_k_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SerqError, match="--rank 999 exceeds the input size K of every"):
        convert(tiny_llama.onnx_path, tmp_path / "out", **{**SMALL, "rank": 999})
    assert not (tmp_path / "out").exists()


def test_runtime_reasons_are_reported(tiny_llama, tmp_path):
    report = convert(tiny_llama.onnx_path, tmp_path / "out", **SMALL)
    assert report.runtime_transforms  # o_proj inputs and the norm permutations
    assert any("residual stream" in k for k in report.runtime_transforms)
    assert "at run time x" in report.summary()


def test_conversion_is_deterministic(tiny_llama, tmp_path):
    """The same model, options and calibration give the same file, byte for byte."""
    settings = {**SMALL, "weight_quant": "gptq"}
    convert(tiny_llama.onnx_path, tmp_path / "a", **settings)
    convert(tiny_llama.onnx_path, tmp_path / "b", **settings)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == \
        (tmp_path / "b" / "model.onnx").read_bytes()
