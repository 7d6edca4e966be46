"""onnxruntime's own 4-bit weight-only quantization (MatMulNBits), as a baseline for SERQ.

The layers quantized are exactly those ``serq-onnx convert`` converts (found by the same pass),
so the two models differ only in how those layers are quantized; ``lm_head``, embeddings and
attention stay float in both. Evaluate the result with ``serq-onnx eval`` like any model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import onnx_ir as ir

from . import output_dir
from .errors import SerqError
from .modelio import load_model
from .plan import ConvertConfig, Plan

NBITS_CONFIG_FILE = "nbits_config.json"
_ACCURACY_LEVELS = range(5)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


def _name_matmuls(model: ir.Model) -> list[ir.Node]:
    """Every MatMul (subgraphs included), renamed where needed so that names are unique:
    onnxruntime's quantizer addresses excluded nodes by name."""
    seen: set[str] = set()
    nodes = []
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.name or node.name in seen:
            node.name = f"{node.name or 'MatMul'}_nbits{i}"
        seen.add(node.name)
        nodes.append(node)
    return nodes


def make_matmulnbits_model(float_model_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                           block_size: int = 128, symmetric: bool = True,
                           accuracy_level: int | None = None, overwrite: bool = False,
                           progress: bool = True) -> Path:
    """Quantize the decoder linears of a float Optimum export to 4-bit MatMulNBits.

    Uses onnxruntime's ``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig``: round to
    nearest, one scale (and a zero point unless ``symmetric``) per ``block_size`` weights along
    K. ``accuracy_level`` is MatMulNBits' compute type (None leaves it unset). ``out_dir``
    receives ``model.onnx``, the other files of the input folder (config, tokenizer) and
    ``nbits_config.json``; nothing is left there unless the whole run succeeds. Returns the
    quantized model's path.
    """
    t0 = time.perf_counter()
    model_path, out_dir = Path(float_model_path), Path(out_dir)
    if not model_path.is_file():
        raise SerqError(f"model file not found: {model_path}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SerqError(f"--block-size must be a power of two >= 16 (MatMulNBits requires it), "
                        f"got {block_size}")
    if accuracy_level is not None and accuracy_level not in _ACCURACY_LEVELS:
        raise SerqError(f"--accuracy-level must be 0..4, got {accuracy_level}")
    out_dir = output_dir.check_output(out_dir, [model_path], overwrite)
    try:
        import onnxruntime
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
        from onnxruntime.quantization.quant_utils import QuantFormat
    except ImportError as e:
        raise SerqError(f"onnxruntime's quantization tools are unavailable ({e}); install "
                        "onnxruntime >= 1.20 with its dependencies") from None
    # Its module logs every node of the graph at INFO; the progress bar says what matters.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    from tqdm.auto import tqdm

    from serq_onnx import passes

    model = load_model(model_path)
    output_dir.check_output(out_dir, output_dir.external_data_files(model), overwrite)
    plan = Plan(ConvertConfig(lm_head="float"))  # the same decoder linears; the head stays float
    passes.FindTargetsPass(plan)(model)
    targets = {t.node for t in plan.targets}
    exclude = [n.name for n in _name_matmuls(model) if n not in targets]
    proto = ir.serde.serialize_model(model)
    del model

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level,
                                          quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul",), bits=4)
    quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=config)
    with tqdm(total=len(targets), desc="MatMulNBits", unit="layer", disable=not progress) as bar:
        quantize_node = quantizer.node_quantizer.quantize

        def counted(node, graph_stack):
            out = quantize_node(node, graph_stack)
            bar.update(1)
            return out

        quantizer.node_quantizer.quantize = counted
        quantizer.process()
    out_proto = quantizer.model.model
    quantized = sum(1 for n in out_proto.graph.node if n.op_type == "MatMulNBits")
    if quantized != len(targets):
        raise SerqError(f"onnxruntime's quantizer replaced {quantized} of the {len(targets)} "
                        f"decoder linears of {model_path}; their weights are in a form it does "
                        "not handle, so this baseline cannot be built for this model")
    quantized_model = ir.serde.deserialize_model(out_proto)

    with output_dir.staged(model_path, out_dir, quantized_model) as (tmp_out, out_model):
        record = {"model": str(model_path), "output": str(out_dir / model_path.name),
                  "quantizer": "onnxruntime MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig "
                               "(round to nearest)",
                  "onnxruntime": onnxruntime.__version__, "bits": 4, "block_size": block_size,
                  "symmetric": symmetric, "accuracy_level": accuracy_level,
                  "layers_quantized": quantized, "matmuls_kept_float": exclude,
                  "seconds": time.perf_counter() - t0}
        (tmp_out / NBITS_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir / model_path.name
