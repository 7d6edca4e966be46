"""Float32 ONNX exports of Hugging Face causal LMs, and tiny random models for tests.

The converter takes Optimum exports as its input, so the project makes them the same way users
do (Optimum's exporter, CPU, float32) instead of hand-writing graphs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SerqError

_TORCH_PIP = "pip install 'serq-onnx[torch]'"
# Files the evaluation harness and the converter read next to model.onnx.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")

# Text for the tiny model's tokenizer: its merges only need to exist, not to be good.
_TINY_TOKENIZER_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "The quick brown fox jumps over the lazy dog; 0123456789 times, then rests.",
)
TINY_VOCAB = 320  # 256 byte symbols + 2 special tokens + merges


def export_causal_lm(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     task: str = "text-generation-with-past", dtype: str = "fp32",
                     validate: bool = True) -> Path:
    """Export ``hf_dir`` with Optimum (on the CPU, ``dtype`` fp32 or fp16) into ``out_dir``;
    returns ``model.onnx``. ``validate``: Optimum's check of the export against PyTorch (a
    second onnxruntime session and PyTorch run: time, not the peak, which is the export's
    own serialization).

    Does nothing if ``out_dir/model.onnx`` exists. The export is written to a temporary folder
    and moved in with ``model.onnx`` last, so an interrupted export is never mistaken for a
    finished one. Config and tokenizer files are copied alongside.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model_path = out_dir / "model.onnx"
    if model_path.is_file():
        return model_path
    if not (hf_dir / "config.json").is_file():
        raise SerqError(f"{hf_dir} has no config.json; pass a folder written by save_pretrained")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise SerqError(f"exporting needs optimum-onnx ({e}); run `{_TORCH_PIP}`") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        main_export(str(hf_dir), tmp, task=task, device="cpu", dtype=dtype,
                    local_files_only=True, do_validation=validate)
        if not (tmp / "model.onnx").is_file():
            raise SerqError(f"Optimum wrote no model.onnx for {hf_dir} (task {task}); "
                            "check that the task suits this model")
        for name in _SIDE_FILES:
            if (hf_dir / name).is_file() and not (tmp / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        out_dir.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "model.onnx"):
            f.replace(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_path


def _tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (any text encodes) small enough for a tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TINY_TOKENIZER_TEXT, trainer)
    # As Llama's tokenizers: no token_type_ids, which generate() would refuse.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 20,
                                   model_input_names=["input_ids", "attention_mask"])


# Tiny configs per architecture, on top of the shared sizes in ``make_tiny_model``: the
# ``transformers`` config class and what the architecture needs to be small and valid.
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    # Mistral-7B-v0.1's sliding window (4096, longer than any test sequence).
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    # q/k/v projections with bias.
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    # RMSNorm on each head of q and k (q_norm, k_norm); head_dim is a free parameter.
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),
    # One fused qkv_proj and one fused gate_up_proj per layer.
    "phi3": ("Phi3Config", {"sliding_window": None, "rope_scaling": None}),
    # tanh-GELU MLP, (1 + gamma) norms before and after each block, sqrt(hidden)-scaled
    # embeddings, tied head, logit softcapping, alternating sliding-window layers.
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                "hidden_activation": "gelu_pytorch_tanh",
                                "sliding_window": 4096, "tie_word_embeddings": True}),
}


def make_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0,
                    **overrides: Any) -> Path:
    """Save a tiny random causal LM of architecture ``arch`` with a tokenizer into ``out_dir``;
    returns it.

    ``arch`` is a key of ``TINY_ARCHS`` (llama, mistral, qwen2, qwen3, phi3, gemma2): what the
    converter must handle in each family (biases, q/k norms, fused projections, GELU MLPs) at
    test sizes. Defaults: hidden 64, intermediate 160, 4 heads, 2 kv heads (GQA), 2 layers;
    ``overrides`` go to the architecture's config (e.g. ``hidden_size=96,
    intermediate_size=200`` for sizes that are not multiples of the quantization groups). The
    weights depend only on ``seed`` and the config.
    """
    if arch not in TINY_ARCHS:
        raise SerqError(f"unknown tiny architecture {arch!r}; choose one of "
                        f"{', '.join(TINY_ARCHS)}")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SerqError(f"the tiny model needs torch and transformers ({e}); "
                        f"run `{_TORCH_PIP}`") from None
    tokenizer = _tiny_tokenizer()
    config_class, arch_params = TINY_ARCHS[arch]
    params = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    params.update(arch_params)
    params.update(overrides)
    heads, kv_heads = params["num_attention_heads"], params["num_key_value_heads"]
    if ("head_dim" not in params and params["hidden_size"] % heads) or heads % kv_heads:
        raise SerqError(f"hidden_size {params['hidden_size']}, {heads} heads and {kv_heads} kv "
                        "heads do not divide evenly; pick sizes where they do")
    if params["vocab_size"] < len(tokenizer):
        raise SerqError(f"vocab_size {params['vocab_size']} is below the tiny tokenizer's "
                        f"{len(tokenizer)} tokens; leave vocab_size at its default")
    config = getattr(transformers, config_class)(**params)
    if (config.pad_token_id or 0) >= params["vocab_size"]:  # Phi-3's default: 32000
        config.pad_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` with a tokenizer into ``out_dir``; returns it.

    ``make_tiny_model(out_dir, "llama", seed, **overrides)``: hidden 64, intermediate 160,
    4 heads, 2 kv heads (GQA), 2 layers; ``overrides`` go to ``LlamaConfig``.
    """
    return make_tiny_model(out_dir, "llama", seed, **overrides)


def export_dynamo(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  example_ids: np.ndarray) -> Path:
    """``torch.onnx.export(..., dynamo=True)`` of a causal LM without a KV cache (inputs
    ``input_ids``, ``attention_mask``; output ``logits``; batch and length dynamic), with the
    folder's JSON files beside it: the dynamo graph form the converter accepts. Returns
    ``out_dir/model.onnx``."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(hf_dir).iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out / f.name)
    x = torch.as_tensor(np.asarray(example_ids, np.int64).reshape(1, -1))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(Logits(hf), (x, torch.ones_like(x)), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                      "attention_mask": {0: batch, 1: seq}}).save(
        str(out / "model.onnx"))
    return out / "model.onnx"
