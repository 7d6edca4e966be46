"""Every common decoder architecture converts at both schemes and computes what the PyTorch
fake-quant computes: tiny random Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms), Phi-3
(fused qkv_proj and gate_up_proj) and Gemma2 (tanh-GELU MLP, four norms per block, scaled
embeddings, softcapping), each exported by Optimum once per session."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import serq_onnx  # noqa: E402
from serq_onnx import compare  # noqa: E402
from serq_onnx.cli import main as cli_main  # noqa: E402
from serq_onnx.converter import convert  # noqa: E402
from serq_onnx.fakequant_torch import fakequant_logits  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
SETTINGS = dict(rank=16, group_w=32, group_a=32)
SEPARATE = {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2, "lm_head": 1}
ROLES = {
    "phi3": {"qkv": 2, "o": 2, "gate_up": 2, "down": 2, "lm_head": 1},
    # The logits are softcapped (30 tanh(z / 30)): no MatMul makes them, so the head stays float.
    "gemma2": {k: v for k, v in SEPARATE.items() if k != "lm_head"},
}
# What onnxruntime's GroupQueryAttention computes like the export (passes/fuse_attention.py);
# the others keep the exported attention and the report says why.
FUSED_ATTENTION = {"llama", "qwen2", "qwen3", "phi3"}
NOT_FUSED_BECAUSE = {"mistral": "sliding-window", "gemma2": "sliding-window"}
# RMSNorms whose output only linears read, so s folds into gamma: 2 per block (before attention
# and before the MLP) and the final norm before an int8 head. Gemma2's post-attention and
# post-MLP norms feed the residual add, and its head is float.
NORM_FOLDS = {"gemma2": 4}


def _ids(vocab: int, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(n)]


@pytest.fixture(scope="module")
def float_logits(tiny_arch):
    """Per architecture: the calibration and evaluation tokens and the float export's logits."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            m = tiny_arch(arch)
            calib = _ids(m.config["vocab_size"], 4, 48, seed=1)
            eval_ids = _ids(m.config["vocab_size"], 1, 40, seed=2)[0]
            cache[arch] = calib, eval_ids, compare.logits(compare.cpu_session(m.onnx_path),
                                                          eval_ids)
        return cache[arch]

    return get


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_converts_and_matches_fakequant(tiny_arch, float_logits, arch, scheme,
                                                     tmp_path):
    m = tiny_arch(arch)
    calib, eval_ids, flt = float_logits(arch)
    report = convert(m.onnx_path, tmp_path / "out", scheme=scheme, calib_ids=calib,
                     progress=False, log=lambda *a: None, **SETTINGS)
    got = compare.logits(serq_onnx.session(tmp_path / "out" / "model.onnx"), eval_ids)
    ref = fakequant_logits(m.hf_dir, [torch.as_tensor(s) for s in calib],
                           torch.as_tensor(eval_ids)[None], bits_a=8 if scheme == "w4a8" else 4,
                           bits_w=4, lm_head=report.config["lm_head"], **SETTINGS)
    ref = np.asarray(ref, np.float64).reshape(got.shape)
    to_ref, to_float = compare.diff(got, ref), compare.diff(got, flt)

    # Same algorithm, independent code (the ONNX graph against Hugging Face's PyTorch model).
    # Where no code differs they agree to float32 rounding (measured 2e-7 relative: w4a4 of
    # llama, mistral, phi3, gemma2; phi3 w4a8). The activations differ in their last bits
    # between the two, so now and then a code rounds the other way, and GPTQ carries a weight
    # code's difference into the later columns: measured 1e-4 (qwen2, qwen3), 1.8e-3 (llama
    # and mistral w4a8; 2e-7 with round-to-nearest weights), 5.9e-3 (gemma2 w4a8, whose
    # normalised block outputs amplify any change; 1.8e-3 with round-to-nearest). Quantization
    # itself moves the logits 40-45x more than the worst of these, hence the ratio bound.
    assert to_ref.rel_rms < 1.5e-2 and to_ref.rel_rms < to_float.rel_rms / 15, (to_ref, to_float)
    assert to_ref.top1_agree >= 0.95, to_ref  # measured: one of 40 tokens differs at most
    # Quantization error against float, measured 0.07-0.10 (w4a8) and 0.10-0.13 (w4a4);
    # Gemma2 0.27 / 0.39: its post-norms scale every block's output (and its error) up to the
    # residual's size, where the other random models add small block outputs to it.
    bound = (0.4 if scheme == "w4a8" else 0.55) if arch == "gemma2" else (
        0.15 if scheme == "w4a8" else 0.2)
    assert to_float.rel_rms < bound, to_float

    assert report.layers_by_role == ROLES.get(arch, SEPARATE)
    assert report.config["lm_head"] == ("float" if arch == "gemma2" else "int8")
    norms = NORM_FOLDS.get(arch, 5)
    # down_proj's s and permutation fold into up (and gate) in every architecture: separate
    # projections, Phi-3's gate_up cut by Slice, Gemma2's tanh-GELU made of Mul/Tanh.
    assert report.folds == {"scale->gamma": norms, "scale->up": 2, "perm->gate,up": 2,
                            "run time": 2}, report.folds
    # At run time: the norms' permutation (their input is the residual stream) and o_proj's
    # input (attention output); never the MLP product.
    assert sum(report.runtime_transforms.values()) == norms + 2, report.runtime_transforms
    assert not any(k.startswith("act(gate) * up") for k in report.runtime_transforms)
    if arch in FUSED_ATTENTION:
        assert report.attention.startswith("GroupQueryAttention in 2 layers"), report.attention
    else:
        assert report.attention.startswith("as exported (") and (
            NOT_FUSED_BECAUSE[arch] in report.attention), report.attention


def test_layers_pattern_converts_only_the_matching_linears(tiny_arch, float_logits, tmp_path):
    """Phi-3's MLPs only: the attention projections stay float MatMuls, the fold still holds."""
    m = tiny_arch("phi3")
    calib, eval_ids, flt = float_logits("phi3")
    report = convert(m.onnx_path, tmp_path / "out", calib_ids=calib, progress=False,
                     layers=r"\.mlp\.", log=lambda *a: None, **SETTINGS)
    assert report.layers_by_role == {"gate_up": 2, "down": 2, "lm_head": 1}
    assert sorted(report.layers_left_float) == [f"layers.{i}.self_attn.{p}_proj"
                                                for i in (0, 1) for p in ("o", "qkv")]
    assert report.folds["scale->up"] == 2 and report.config["layers"] == r"\.mlp\."
    got = compare.logits(serq_onnx.session(tmp_path / "out" / "model.onnx"), eval_ids)
    # Fewer layers quantized: closer to float than the full conversion (0.079 measured).
    assert compare.diff(got, flt).rel_rms < 0.06


def test_layers_pattern_from_the_cli(tiny_arch, tmp_path, capsys):
    m = tiny_arch("llama")
    out = tmp_path / "out"
    assert cli_main(["convert", str(m.onnx_path), "-o", str(out), "--layers", "no_such_layer",
                     "--no-verify", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers 'no_such_layer' matches none of the 14" in err[0], err
    assert "layers.0.self_attn.q_proj" in err[0] and not out.exists()
    assert cli_main(["convert", str(m.onnx_path), "-o", str(out), "--layers", "(",
                     "--no-verify", "-q"]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_unknown_tiny_architecture_is_a_clear_error(tmp_path):
    from serq_onnx import SerqError
    from serq_onnx.export import make_tiny_model

    with pytest.raises(SerqError, match="unknown tiny architecture 'gpt2'; choose one of llama, "
                       "mistral, qwen2, qwen3, phi3, gemma2"):
        make_tiny_model(tmp_path / "hf", "gpt2")
    assert not (tmp_path / "hf").exists()
