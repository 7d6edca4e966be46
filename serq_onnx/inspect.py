"""``serq-onnx inspect``: what ``convert`` would do with a model, decided without calibration.

It runs the structural part of the pipeline for real (attention fusion without its numeric
check, untying the head, finding the targets) and the fold pass on synthetic statistics, so the
layers, folds and run-time transforms it lists are the converter's own decisions, not a
re-derivation. Sizes come from the op's formats; time and memory from a model calibrated on
measured conversions (see :data:`REFERENCE`). Nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import calibration, converter, gram_chunks, output_dir, pipeline, reference
from .cache_dims import pin_cache_dims
from .modelio import load_model, model_nbytes
from .plan import ConvertConfig, Plan, Target

MIB = 1024 * 1024

# Measured conversion of SmolLM2-135M (float32, 514 MiB; 210 decoder linears, 106.2 M weights)
# with 32 x 512 calibration tokens on an idle machine (models/smollm2-135m/RESULTS.md, "GPTQ vs
# round to nearest"): calibration 39.9 s (absmax only) and 59.8 s (with Gram matrices), main
# weight rounding 7.6 s (round to nearest, searched scales) and 23.3 s (GPTQ), totals 61.5 s
# and 96.0 s. The rates below divide the work of that run (FLOPs, weights) by those times.
REFERENCE = dict(
    tokens=32 * 512,
    forward_flops_per_token=2 * (106.2e6 + 49152 * 576),  # linears + the tied LM head
    gram_flops_per_token=2 * 30 * (3 * 576 ** 2 + 1536 ** 2),  # sum of K^2 over group inputs
    weights=106.2e6,
    calib_s=39.9, gram_s=59.8 - 39.9, rtn_mse_s=7.6, gptq_s=23.3,
    # load, fold check, op check, save, verify (~ model bytes): the rest of each total
    other_s=((61.5 - 39.9 - 7.6) + (96.0 - 59.8 - 23.3)) / 2,
    model_bytes=514 * MIB,
)
_R = REFERENCE
FORWARD_FLOPS_PER_S = _R["tokens"] * _R["forward_flops_per_token"] / _R["calib_s"]
GRAM_FLOPS_PER_S = _R["tokens"] * _R["gram_flops_per_token"] / _R["gram_s"]
RTN_MSE_WEIGHTS_PER_S = REFERENCE["weights"] / REFERENCE["rtn_mse_s"]
# GPTQ: a Cholesky factor and a triangular inverse per group input (about 3 K^3 FLOPs, at the
# forward pass's rate), then a sweep whose cost is per weight (576 x 1536 and 1536 x 576 take
# the same time here); the sweep's rate is what remains of the measured time.
GPTQ_FLOPS_PER_K3 = 3.0
_REF_K3 = 30 * (3 * 576 ** 3 + 1536 ** 3)
GPTQ_WEIGHTS_PER_S = REFERENCE["weights"] / (
    REFERENCE["gptq_s"] - GPTQ_FLOPS_PER_K3 * _REF_K3 / FORWARD_FLOPS_PER_S)
# Measured here on one 576 x 1536 and one 1536 x 576 layer: absmax rounding is 22-37x faster
# than the searched scales; GPTQ with absmax scales takes about 0.8x the time of GPTQ with
# searched ones (the sweep dominates).
ABSMAX_SPEEDUP = 25.0
GPTQ_ABSMAX_FACTOR = 0.8
OTHER_S_PER_BYTE = REFERENCE["other_s"] / REFERENCE["model_bytes"]
# Resident memory of a Python process with numpy, onnx_ir, onnxruntime and tokenizers loaded:
# the tiny test model's conversion peaks at 154 MiB (its arrays are negligible).
BASE_RSS = 150 * MIB
# Peak bytes per Gram entry held while summing: the float32 sums, the float32 set one
# calibration run returns, and onnxruntime's buffers. Measured over round to nearest on
# SmolLM2-135M (411 MiB for 39.8 M entries: 10.8 B) and over loading on the synthetic 0.47B
# (4833 MiB for 479 M entries: 10.6 B), each sequence's set freed before the next runs.
GRAM_PEAK_BYTES_PER_ENTRY = 11
GRAM_BYTES_HELD = 4  # the float32 sums alone, while GPTQ solves
# The peak is the larger of two stages' (models/RESULTS-scale.md, sections 2, 4 and 5). The
# float checks and calibration: an onnxruntime session's copy of the weights (prepacked) beside
# the converter's own arrays, which hold about one layer's weights now that folded, flattened,
# residual and packed weights are computed when read or written to disk as made.
# MODEL_COPIES: from one .onnx file (its weights parsed into memory; the synthetic 0.47B,
# round to nearest: 4685 MiB); MODEL_COPIES_EXTERNAL: external data (0.47B: 2239 MiB, 1.47B:
# 6267 MiB); MODEL_COPIES_MAPPED: the same with --low-memory, whose sessions read the weights
# where the file maps them (anonymous memory; the page cache holds the file once more and
# gives it back under pressure: 0.47B, 619 MiB). GPTQ: the Gram matrices of one chunk beside
# GPTQ_STAGE_COPIES of the model (the summing session's: 0.89 on the 0.47B with every Gram
# matrix in calibration's pass, 6766 MiB; 0.10 anonymous with --low-memory), the larger of
# summing them (GRAM_PEAK_BYTES_PER_ENTRY) and solving the widest group: its float32 Gram
# beside four float64 K x K arrays (passes.gptq._inverse_cholesky_upper), GPTQ_SOLVE_BYTES
# per K^2 (1 GiB at K = 8192, 6 GiB at Llama-3-8B's K = 14336). From one file, the parsed
# weights stay (+1).
MODEL_COPIES = 2.54
MODEL_COPIES_EXTERNAL = 1.17
MODEL_COPIES_MAPPED = 0.26
GPTQ_STAGE_COPIES = 0.89
GPTQ_STAGE_COPIES_MAPPED = 0.10  # --low-memory, anonymous (0.47B: 1620 MiB at 512 MiB)
GPTQ_SOLVE_BYTES = 32
# --low-memory's forward passes: unprepacked GEMMs (0.47B, 256 tokens: 2.10 s against 1.65 s)
LOW_MEMORY_FORWARD_FACTOR = 1.27


@dataclass
class Inspection:
    """What a conversion with these settings would do; ``summary()`` prints it."""

    model: str
    config: dict
    layers: list[dict]
    groups: list[dict]
    folds: dict
    runtime_transforms: dict
    layers_by_role: dict
    ranks: dict
    attention: str
    calib_tokens: int
    calib_source: str
    bytes_before: int
    bytes_after: int
    size_breakdown: dict
    estimate_seconds: dict
    estimate_peak_bytes: int
    estimate_note: str
    passes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Runs over the calibration text and, of them, the runs that collect Gram matrices (GPTQ:
    # 1 when they all fit --gram-memory, else one per chunk); their total and largest bytes.
    calibration_passes: int = 0
    gram_passes: int = 0
    gram_bytes: int = 0
    gram_chunk_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        cfg = self.config
        lines = [
            f"model: {self.model}",
            f"scheme {cfg['scheme']}, method {cfg['method']}, rank {cfg['rank']}, groups "
            f"w{cfg['group_w']}/a{cfg['group_a']}, main weight {cfg['weight_quant']} with "
            f"{cfg['weight_scale']} scales, lm_head {cfg['lm_head']}",
            f"linear layers to convert: {len(self.layers)} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.layers_by_role.items()))})",
            "  layer                          role      K      N  bits  rank",
        ]
        for d in self.layers:
            lines.append(f"  {d['name']:<30} {d['role']:<7} {d['K']:>6} {d['N']:>6}  "
                         f"w{d['bits_w']}a{d['bits_a']} {d['rank']:>5}")
        lines.append(f"input groups: {len(self.groups)}")
        for g in self.groups:
            where = ", ".join(g["folded"]) or "nothing folded"
            why = f"; at run time: {g['runtime_reason']}" if g["runtime_reason"] else ""
            lines.append(f"  {g['name']} ({g['kind']}, {len(g['targets'])} layers): {where}{why}")
        lines.append("folds: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.folds.items()))
                                  or "none"))
        lines += [f"  at run time x{v}: {k}" for k, v in sorted(self.runtime_transforms.items())]
        lines.append(f"attention: {self.attention}")
        lines.append(f"calibration: {self.calib_tokens} tokens from {self.calib_source}")
        if self.gram_passes:
            mib = cfg.get("gram_memory_mib", 0)
            lines.append(
                f"calibration passes: {self.calibration_passes} ("
                + ("per-channel statistics and all Gram matrices together, "
                   f"{_mib(self.gram_bytes)} MiB within --gram-memory {mib:g} MiB"
                   if self.gram_passes == 1 else
                   f"per-channel statistics, then Gram matrices in {self.gram_passes} chunks of "
                   f"at most {_mib(self.gram_chunk_bytes)} MiB: all {_mib(self.gram_bytes)} "
                   f"MiB exceed --gram-memory {mib:g} MiB") + ")")
        elif self.calibration_passes:
            lines.append(f"calibration passes: {self.calibration_passes}")
        b = self.size_breakdown
        lines.append(f"size: {self.bytes_before / MIB:.1f} MiB -> about "
                     f"{self.bytes_after / MIB:.1f} MiB "
                     f"({self.bytes_after / max(self.bytes_before, 1):.1%}): converted layers "
                     f"{b['float_weights'] / MIB:.1f} -> {b['serq_weights'] / MIB:.1f} MiB, "
                     f"the rest {b['rest'] / MIB:.1f} MiB")
        est = self.estimate_seconds
        lines.append(f"estimated time: {est['total']:.0f} s ("
                     + ", ".join(f"{k} {v:.0f} s" for k, v in est.items() if k != "total")
                     + f"); estimated peak memory: {self.estimate_peak_bytes / MIB:.0f} MiB"
                     + (" (anonymous; the page cache holds the weights once more, and gives them "
                        "back under pressure)" if self.config.get("low_memory") else ""))
        lines.append(f"  ({self.estimate_note})")
        lines.append("passes:")
        for i, p in enumerate(self.passes, 1):
            lines.append(f"  {i:>2}. {p['name']} ({p['pass_name']}): {p['purpose']}")
            lines.append(f"      when: {p['when']}; requires: {p['requires']}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mib(nbytes: int) -> str:
    v = nbytes / MIB
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def serq_nbytes(t: Target, cfg: ConvertConfig) -> int:
    """Bytes of a target's SerqMatMul inputs B, scales and wsum (``reference.assemble_weights``
    layout: codes ``[N, K_ext]`` at bits_w, float32 scales per group_w, int32 sums per block)."""
    bits_w, bits_a = t.layer_bits(cfg)
    return layout_nbytes(reference.Layout(K=t.K, N=t.N, rank=t.layer_rank(cfg),
                                          group_w=cfg.group_w, group_a=cfg.group_a,
                                          bits_w=bits_w, bits_a=bits_a))


def layout_nbytes(L: reference.Layout) -> int:
    return (L.N * L.K_ext * L.bits_w // 8 + L.N * (L.K_ext // L.group_w) * 4
            + L.N * (L.K_ext // L.block) * 4)


def _lowrank_nbytes(t: Target, cfg: ConvertConfig) -> int:
    """L2QER's 8-bit factors A ``[K, r]`` and B ``[r, N]`` as two SerqMatMuls."""
    from .passes.lowrank_branch import LOWRANK_BITS

    r = min(cfg.rank, t.K, t.N, *([t.rank_cap] if t.rank_cap is not None else []))
    if r == 0:
        return 0
    a = reference.Layout(K=t.K, N=r, rank=0, group_w=cfg.group_w, group_a=cfg.group_a,
                         bits_w=LOWRANK_BITS, bits_a=cfg.bits_a)
    b = reference.Layout(K=r, N=t.N, rank=0, group_w=cfg.group_w, group_a=cfg.group_a,
                         bits_w=LOWRANK_BITS, bits_a=LOWRANK_BITS)
    return layout_nbytes(a) + layout_nbytes(b)


def _live_initializer_bytes(model: ir.Model) -> int:
    """Initializer bytes that ``CleanupPass`` would keep (used, or a graph output/input)."""
    outs, ins = set(model.graph.outputs), set(model.graph.inputs)
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and (v.uses() or v in outs or v in ins))


# Protobuf bytes of one SerqMatMul node (op, domain, 8 attributes, names; 190-230 measured on
# the tiny Llama's conversions) and of one initializer beyond its name and data.
SERQ_NODE_BYTES = 230
INIT_BYTES = 20


def _graph_bytes(model: ir.Model, plan: Plan, node_bytes: float, fuse: bool) -> int:
    """Bytes of the converted graph without initializer data: the float nodes that stay at the
    export's bytes per node, the SerqMatMul nodes (and L2QER branches, fused Splits) at
    ``SERQ_NODE_BYTES``, each initializer its name plus ``INIT_BYTES``."""
    from .passes.fold_flattening import RUNTIME_KEY

    cfg = plan.config
    kept = sum(1 for n in model.graph if n.metadata_props.get(RUNTIME_KEY) is None
               and n not in {t.node for t in plan.targets})
    serq_nodes, inits = 0, 0
    for g in plan.groups:
        names = sum(len(t.weight.name or t.name) + 11 for t in g.targets)  # ".serq_scales"
        fused = fuse and len(g.targets) > 1 and cfg.method != "l2qer"
        serq_nodes += 2 if fused else len(g.targets)  # the fused op and its Split
        inits += (3 * (names // len(g.targets) + 7) + 40) if fused else 3 * names
        if cfg.method == "l2qer":
            serq_nodes += 3 * len(g.targets)  # A, B and the Add
            inits += 6 * names + 6 * 30
    live = [v for v in model.graph.initializers.values()
            if v.uses() and not any(u.node in {t.node for t in plan.targets} and u.idx == 1
                                    for u in v.uses())]
    inits += sum(len(v.name or "") for v in live)
    n_inits = len(live) + 3 * len(plan.targets) * (3 if cfg.method == "l2qer" else 1)
    return int(kept * node_bytes + serq_nodes * SERQ_NODE_BYTES + inits + n_inits * INIT_BYTES)


def _estimate_size(model: ir.Model, plan: Plan, node_bytes: float, fuse: bool) -> dict:
    """Bytes of the converted model file(s): the initializers the float graph keeps after the
    folds, less the target weights, plus their SerqMatMul inputs, plus the graph itself."""
    cfg = plan.config
    float_w = sum(t.weight.const_value.nbytes for t in plan.targets)
    serq = sum(serq_nbytes(t, cfg) for t in plan.targets)
    if cfg.method == "l2qer":
        serq += sum(_lowrank_nbytes(t, cfg) for t in plan.targets)
    # FP16 graphs carry act_scale in FP16 until ReplaceMatMulPass hands it over in float32
    from .passes.fold_flattening import RUNTIME_KEY

    f16_scales = sum(n.inputs[1].const_value.nbytes for n in model.graph
                     if n.metadata_props.get(RUNTIME_KEY) == "scale"
                     and n.inputs[1].const_value.dtype == ir.DataType.FLOAT16)
    rest = _live_initializer_bytes(model) - float_w + f16_scales
    graph = _graph_bytes(model, plan, node_bytes, fuse)
    return dict(float_weights=float_w, serq_weights=serq, rest=rest, graph=graph,
                total=serq + rest + graph)


def _forward_flops(plan: Plan, vocab: int) -> float:
    """FLOPs per token of the float model's linear layers (the LM head counted even if float)."""
    flops = 2.0 * sum(t.K * t.N for t in plan.targets)
    if not any(t.role == "lm_head" for t in plan.targets):
        flops += 2.0 * vocab * plan.targets[0].K
    return flops


def _chunk_forward_flops(plan: Plan, chunks: list[list[int]]) -> float:
    """FLOPs per token of the forward passes that collect chunked Gram matrices: together they
    run the linears before the last chunk's deepest group once (each pass starts where the one
    before stopped and is cut after its deepest group's input: ``serq_onnx.graph_cut``; graphs
    it does not cut, FP16 ones among them, run more: each pass from the start)."""
    if len(chunks) <= 1:
        return 0.0
    per_group = [2.0 * sum(t.K * t.N for t in g.targets) for g in plan.groups]
    return float(sum(per_group[:chunks[-1][-1]]))


def peak_bytes(model_bytes: int, external: bool, gram_entries: int, logits_bytes: int,
               low_memory: bool = False, widest_k: int = 0) -> int:
    """Peak resident bytes (anonymous, with ``low_memory``): the larger of the float stages'
    and GPTQ's sweep's (``gram_entries``: the largest chunk's; 0 without GPTQ; ``widest_k``:
    the largest K of a group, whose solve holds float64 ``K x K`` arrays)."""
    if not external:
        checks, sweep = MODEL_COPIES, GPTQ_STAGE_COPIES + 1.0
    else:
        checks, sweep = ((MODEL_COPIES_MAPPED, GPTQ_STAGE_COPIES_MAPPED) if low_memory else
                         (MODEL_COPIES_EXTERNAL, GPTQ_STAGE_COPIES))
    stage = checks * model_bytes
    if gram_entries:
        grams = max(GRAM_PEAK_BYTES_PER_ENTRY * gram_entries,
                    GRAM_BYTES_HELD * gram_entries + GPTQ_SOLVE_BYTES * widest_k ** 2)
        stage = max(stage, sweep * model_bytes + grams)
    return int(BASE_RSS + stage + logits_bytes)


def estimate(plan: Plan, tokens: int, seqlen: int, bytes_before: int, vocab: int,
             verify: bool = True, external: bool = False) -> tuple[dict, int]:
    """Seconds per stage and peak resident bytes of the conversion: rates of
    :data:`REFERENCE` (an idle desktop-class CPU) applied to this model's work."""
    cfg = plan.config
    weights = float(sum(t.K * t.N for t in plan.targets))
    chunks = plan.gram_chunks()
    secs: dict[str, float] = {}
    if cfg.needs_calibration:
        secs["calibration"] = tokens * _forward_flops(plan, vocab) / FORWARD_FLOPS_PER_S
        if cfg.weight_quant == "gptq":
            gram = sum(2.0 * g.K ** 2 for g in plan.groups)
            secs["calibration"] += tokens * gram / GRAM_FLOPS_PER_S
            # the chunks' passes run inside GPTQ's stage at conversion; counted here
            secs["calibration"] += tokens * _chunk_forward_flops(plan, chunks) / FORWARD_FLOPS_PER_S
    if cfg.weight_quant == "gptq":
        secs["gptq"] = weights / GPTQ_WEIGHTS_PER_S * (
            1.0 if cfg.weight_scale == "mse" else GPTQ_ABSMAX_FACTOR)
        secs["gptq"] += sum(GPTQ_FLOPS_PER_K3 * g.K ** 3 for g in plan.groups) / FORWARD_FLOPS_PER_S
    else:
        secs["quantization"] = weights / RTN_MSE_WEIGHTS_PER_S / (
            1.0 if cfg.weight_scale == "mse" else ABSMAX_SPEEDUP)
    if cfg.low_memory and "calibration" in secs:
        secs["calibration"] *= LOW_MEMORY_FORWARD_FACTOR
    secs["other"] = bytes_before * OTHER_S_PER_BYTE * (1.0 if verify else 0.5)
    secs["total"] = sum(secs.values())
    entries = widest = 0
    if cfg.weight_quant == "gptq":  # the largest chunk's (every group's when they fit)
        entries = max((sum(plan.groups[i].K ** 2 for i in c) for c in chunks), default=0)
        widest = max((g.K for g in plan.groups), default=0)
    peak = peak_bytes(bytes_before, external, entries, seqlen * vocab * 4, cfg.low_memory,
                      widest)
    return secs, peak


def inspect_model(model: str | os.PathLike, *, scheme: str = "w4a8", rank: int = 128,
                  group_w: int = 128, group_a: int | None = None, method: str = "serq",
                  calib: str | os.PathLike | None = None, calib_samples: int = calibration.DEFAULT_SAMPLES,
                  calib_seqlen: int = calibration.DEFAULT_SEQLEN, weight_quant: str | None = None,
                  weight_scale: str | None = None, fuse: bool = True, verify: bool = True,
                  smooth_alpha: float = 0.5, lm_head: str = "auto", fuse_attention: bool = True,
                  output: str | os.PathLike | None = None, overwrite: bool = False,
                  layers: str | None = None,
                  gram_memory_mib: float | None = None,
                  low_memory: bool = False, log=print) -> Inspection:
    """What ``convert()`` with these arguments would do, without calibrating or writing.

    ``output``: also check the output folder as ``convert`` would (``convert --dry-run``).
    ``calib``: tokenized (fast) to count the calibration tokens, never run through the model.
    """
    config = ConvertConfig(scheme=scheme, rank=rank, group_w=group_w, group_a=group_a,
                           method=method, weight_quant=weight_quant, weight_scale=weight_scale,
                           smooth_alpha=smooth_alpha, lm_head=lm_head, layers=layers,
                           gram_memory_mib=gram_chunks.DEFAULT_GRAM_MEMORY_MIB if
                           gram_memory_mib is None else gram_memory_mib, low_memory=low_memory)
    options = pipeline.Options(fuse=fuse, fuse_attention=fuse_attention, verify=verify)
    model_path, _ = converter.check_inputs(model, output, calib, calib_samples, calib_seqlen,
                                           overwrite)
    ir_model = load_model(model_path)
    pin_cache_dims(ir_model)  # genai builder graphs name the head size symbolically
    if output is not None:
        output_dir.check_output(output, output_dir.external_data_files(ir_model), overwrite)
    bytes_before = model_nbytes(ir_model)
    config = converter.with_gram_budget(config, gram_memory_mib, bytes_before)
    file_bytes = sum(p.stat().st_size
                     for p in [model_path, *output_dir.external_data_files(ir_model)])
    # the export's bytes per node (its ops, names, attributes), for the nodes that stay float
    node_bytes = max(file_bytes - bytes_before, 0) / max(sum(1 for _ in ir_model.graph), 1)
    if fuse_attention:
        fuse_pass, nodes_before, why_not = converter.fuse_attention_structure(ir_model,
                                                                             model_path)
        attention = (f"would be GroupQueryAttention in {fuse_pass.layers} layers "
                     f"({nodes_before} -> {sum(1 for _ in ir_model.graph)} nodes), if its "
                     "numeric check against the export passes at conversion"
                     if fuse_pass is not None else f"stays as exported ({why_not})")
    else:
        attention = "as exported (--no-fuse-attention)"
    plan, _ = converter.find_targets(ir_model, model_path, config, options, log,
                                     progress=False)
    config = plan.config
    ranks = converter._effective_ranks(plan, log)
    vocab = converter._vocab_size(ir_model)
    if calib is not None:
        ids = calibration.tokenize_file(model_path.parent, calib,
                                        max_tokens=calib_samples * calib_seqlen)
        seqs = calibration.split_sequences(ids, calib_samples, calib_seqlen)
        tokens, source = int(sum(len(s) for s in seqs)), str(calib)
        seqlen = max(len(s) for s in seqs)
    else:
        n, seqlen = min(calib_samples, 8), min(calib_seqlen, 512)
        tokens, source = n * seqlen, "random tokens (no --calib given: accuracy will suffer)"

    notes = []
    if config.flattens:
        # Synthetic statistics in ascending order: a non-identity saliency order, as real
        # activations give, so the fold pass decides each group as it will at conversion.
        for g in plan.groups:
            g.absmax = np.arange(1, g.K + 1, dtype=np.float32)
        if config.method != "smoothquant":
            notes.append("the saliency order is assumed not to be the identity (it is known "
                         "only after calibration); if it were, a norm's permutation would fold")
    from . import passes

    passes.FoldFlatteningPass(plan)(ir_model)
    folds, runtime, roles = converter.plan_counts(plan)
    layer_rows = [dict(name=t.name, role=t.role, layer=t.layer, K=t.K, N=t.N,
                       bits_w=t.layer_bits(config)[0], bits_a=t.layer_bits(config)[1],
                       rank=t.layer_rank(config), group_w=config.group_w,
                       group_a=config.group_a)
                  for t in plan.targets]
    groups = [dict(name=g.name, kind=g.kind, K=g.K, targets=[t.name for t in g.targets],
                   folded=list(g.folded), runtime_reason=g.runtime_reason)
              for g in plan.groups]
    size = _estimate_size(ir_model, plan, node_bytes, fuse)
    secs, peak = estimate(plan, tokens, seqlen, bytes_before, vocab, verify,
                          external=bool(output_dir.external_data_files(ir_model)))
    chunks = plan.gram_chunks()
    note = ("an estimate: the rates of a measured SmolLM2-135M conversion on an idle "
            "desktop CPU applied to this model's FLOPs and weights; scale by your machine's "
            "speed")
    return Inspection(
        model=str(model_path), config=asdict(config), layers=layer_rows, groups=groups,
        folds=folds, runtime_transforms=runtime, layers_by_role=roles, ranks=ranks,
        attention=attention, calib_tokens=tokens, calib_source=source,
        bytes_before=bytes_before, bytes_after=size["total"], size_breakdown=size,
        estimate_seconds={k: round(v, 3) for k, v in secs.items()}, estimate_peak_bytes=peak,
        estimate_note=note, passes=pipeline.describe(config, options, plan), notes=notes,
        calibration_passes=(gram_chunks.calibration_passes(len(chunks))
                            if config.needs_calibration else 0),
        gram_passes=len(chunks),
        gram_bytes=sum(gram_chunks.gram_nbytes(g.K) for g in plan.groups) if chunks else 0,
        gram_chunk_bytes=max((sum(gram_chunks.gram_nbytes(plan.groups[i].K) for i in c)
                              for c in chunks), default=0))

