"""``convert()``: the SERQ pipeline over an ONNX model, written atomically to an output folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import (calibration, distributed, genai, gram_chunks, output_dir, packed_store, pipeline,
               verify as checks)
from .cache_dims import pin_cache_dims
from .errors import SerqError
from .modelio import load_model, model_nbytes
from .plan import ConvertConfig, Plan

CONFIG_FILE = "serq_config.json"
FOLD_TOLERANCE = pipeline.FOLD_TOLERANCE  # kept importable from here


@dataclass
class ConversionReport:
    model: str
    output: str
    config: dict
    layers_converted: int
    serq_nodes: int
    layers_by_role: dict
    folds: dict
    bytes_before: int
    bytes_after: int
    seconds: float
    calib_tokens: int
    calib_source: str
    fold_check: str = ""
    attention: str = ""
    verify: str = ""
    op_check: str = ""
    ranks: dict = field(default_factory=dict)  # effective rank -> layers (clamped to K)
    runtime_transforms: dict = field(default_factory=dict)  # why not folded -> groups
    timings: dict = field(default_factory=dict)
    peak_rss_mib: dict = field(default_factory=dict)  # stage -> process peak RSS after it
    layers_left_float: list = field(default_factory=list)  # not selected by --layers
    # Runs over the calibration text (1, or 1 + gram_passes where the Gram matrices were
    # collected in chunks under --gram-memory), the runs that collected Gram matrices (0
    # without GPTQ), and the seconds of those chunked runs (inside timings["gptq"]).
    calibration_passes: int = 0
    gram_passes: int = 0
    gram_seconds: float = 0.0

    def summary(self) -> str:
        roles = ", ".join(f"{k} {v}" for k, v in sorted(self.layers_by_role.items()))
        mb = 1024 * 1024
        return "\n".join([
            f"converted {self.layers_converted} linear layers to SerqMatMul ({roles}) in "
            f"{self.serq_nodes} nodes" + (" (layers reading the same activation share one)"
                                         if self.serq_nodes < self.layers_converted else ""),
            *([f"left float by --layers: {len(self.layers_left_float)} linear layers"]
              if self.layers_left_float else []),
            f"scheme {self.config['scheme']}, method {self.config['method']}, rank "
            f"{self.config['rank']}, groups w{self.config['group_w']}/a{self.config['group_a']}, "
            f"main weight {self.config.get('weight_quant', 'rtn')} with "
            f"{self.config.get('weight_scale', 'absmax')} scales",
            f"calibration: {self.calib_tokens} tokens from {self.calib_source}"
            + (f"; {self.calibration_passes} passes over them (per-channel statistics, then "
               f"Gram matrices in {self.gram_passes} chunks under --gram-memory "
               f"{self.config.get('gram_memory_mib', 0):g} MiB: {self.gram_seconds:.1f} s of "
               "the GPTQ time)" if self.gram_passes > 1 else ""),
            f"folds: {', '.join(f'{k} x{v}' for k, v in sorted(self.folds.items())) or 'none'}",
            *(f"  at run time x{v}: {k}" for k, v in sorted(self.runtime_transforms.items())),
            f"attention: {self.attention}",
            f"fold check (float graph after folding vs original): {self.fold_check}",
            f"op check (SerqMatMul vs reference): {self.op_check}",
            f"verify (converted vs float): {self.verify}",
            f"size: {self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB "
            f"({self.bytes_after / max(self.bytes_before, 1):.1%})",
            f"time: {self.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in self.timings.items())})",
            *([f"peak memory: {max(self.peak_rss_mib.values()):.0f} MiB (first reached in "
               f"{_first_peak(self.peak_rss_mib)})"] if self.peak_rss_mib else []),
            f"output: {self.output}",
        ])


def _first_peak(rss: dict[str, float]) -> str:
    """The first stage after which the process's peak resident memory was its final peak."""
    top = max(rss.values())
    return next(k for k, v in rss.items() if v >= top)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _vocab_size(model: ir.Model) -> int:
    for out in model.graph.outputs:
        if out.name == "logits" and out.shape is not None and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return 32000


def convert(model: str | os.PathLike, output: str | os.PathLike, *, scheme: str = "w4a8",
            rank: int = 128, group_w: int = 128, group_a: int | None = None, method: str = "serq",
            calib: str | os.PathLike | None = None,
            calib_samples: int = calibration.DEFAULT_SAMPLES,
            calib_seqlen: int = calibration.DEFAULT_SEQLEN,
            calib_ids: list[np.ndarray] | None = None,
            weight_quant: str | None = None, weight_scale: str | None = None, fuse: bool = True,
            verify: bool = True, overwrite: bool = False, progress: bool = True,
            smooth_alpha: float = 0.5, lm_head: str = "auto", fuse_attention: bool = True,
            layers: str | None = None, ray: str | None = None,
            gram_memory_mib: float | None = None,
            low_memory: bool = False, log=print) -> ConversionReport:
    """Convert an Optimum-exported causal LM so that its decoder linears run as SerqMatMul.

    ``output`` receives the converted ``model.onnx`` and every other file of the input folder
    (config, tokenizer, generation config), so it loads wherever the original loaded. Nothing is
    left in ``output`` unless conversion succeeds. ``weight_quant``: ``"gptq"`` compensates
    rounding errors with the Hessian of each layer's calibration inputs; ``"rtn"`` rounds the
    main weight to nearest (faster, less accurate). ``weight_scale``: ``"mse"`` searches each
    weight group's clipping for the least rounding error, ``"absmax"`` takes ``max|w| / 7``.
    None for either: SERQ's gptq and mse, the baselines' rtn and absmax, as published.
    ``group_a`` None takes the scheme's default (128 for w4a8, 32 for w4a4). ``method``
    ``"smoothquant"`` (migration strength ``smooth_alpha``) and ``"l2qer"`` (low-rank error
    correction of rank ``rank``) are baselines built from the same groups, bits and kernels as
    SERQ, for comparison. ``lm_head`` ``"int8"`` also quantizes the LM head (8-bit weights and
    activations through SerqMatMul, no salient correction); ``"float"`` keeps it float;
    ``"auto"`` (the default) is int8 where the head is a MatMul with a constant weight, else
    float. The report records what was done. ``fuse_attention``: each layer's attention
    becomes onnxruntime's ``GroupQueryAttention`` (``passes.FuseAttentionPass``), checked
    against the original graph; where it is not recognised or the check fails the attention
    stays as exported, and the report says why. ``layers``: a regular expression; only the
    decoder linears whose label (``layers.3.mlp.down_proj``, as in the report) or node name it
    matches (``re.search``) are converted, the others stay float (``layers_left_float``); None
    converts every one. The LM head follows ``lm_head`` alone. ``ray``: a Ray cluster's
    address, or ``"auto"`` (a local instance started for the conversion): calibration
    sequences and GPTQ groups run on its workers, giving the same model as one process
    (``serq_onnx.distributed``); None (the default) runs them here. ``gram_memory_mib``: the
    MiB of GPTQ Gram matrices (float32 ``K x K`` per input group) held at once; where all of
    them exceed it, they are collected and consumed in chunks of consecutive layer groups, one
    more pass over the calibration text per chunk, giving the same model
    (``serq_onnx.gram_chunks``; 0: one group at a time; None: ``gram_chunks.default_budget``
    of the model, a quarter of its float size within 0.5-4 GiB, a sixteenth with
    ``low_memory``). ``low_memory``: the float onnxruntime sessions (checks, calibration) read
    the weights where the model file maps them instead of copying them
    (``ConvertConfig.low_memory``): for models near the machine's memory; forward passes about
    25% slower, float rounding slightly different.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rss: dict[str, float] = {}
    config = ConvertConfig(scheme=scheme, rank=rank, group_w=group_w, group_a=group_a,
                           method=method, weight_quant=weight_quant, weight_scale=weight_scale,
                           smooth_alpha=smooth_alpha, lm_head=lm_head, layers=layers,
                           gram_memory_mib=gram_chunks.DEFAULT_GRAM_MEMORY_MIB if
                           gram_memory_mib is None else gram_memory_mib, low_memory=low_memory)
    options = pipeline.Options(fuse=fuse, fuse_attention=fuse_attention, verify=verify)
    model_path, out_dir = check_inputs(model, output, calib, calib_samples, calib_seqlen,
                                       overwrite, calib_ids is not None)
    distributed.check_address(ray)

    ir_model = load_model(model_path)
    pin_cache_dims(ir_model)
    data_files = output_dir.external_data_files(ir_model)
    output_dir.check_output(output, data_files, overwrite)
    bytes_before = model_nbytes(ir_model)
    config = with_gram_budget(config, gram_memory_mib, bytes_before)
    t = time.perf_counter()
    if fuse_attention:
        ir_model, attention = _fuse_attention(ir_model, model_path, log, not low_memory)
    else:
        attention = "as exported (--no-fuse-attention)"
    timings["attention"] = time.perf_counter() - t
    rss["load, attention"] = round(pipeline.peak_rss_mib(), 1)
    plan, ctx = find_targets(ir_model, model_path, config, options, log, progress)
    # Packed layers go to disk as they are done where the output gets external data anyway.
    plan.packed_store = packed_store.PackedStore() if data_files else None
    try:
        config = plan.config
        ranks = _effective_ranks(plan, log)

        sequences, source = _calibration_sequences(ir_model, model_path, calib, calib_samples,
                                                   calib_seqlen, calib_ids, log)
        calib_tokens = int(sum(len(s) for s in sequences))
        check_seqs = [s[:128] for s in sequences[:2]]
        ctx.sequences, ctx.check_sequences = sequences, check_seqs
        if config.needs_calibration:
            timings["calibration"] = 0.0  # listed first even when it fails fast
        # Without calibration (so without GPTQ) there is nothing to share out.
        with distributed.cluster(ray if config.needs_calibration else None) as cluster:
            if cluster is not None:
                ctx.calib_runner, ctx.group_mapper = cluster.calib_runner, cluster.group_mapper
            pipeline.run(pipeline.steps_for(config, options, phase="transform"), ir_model, ctx,
                         timings, rss)
        calibrate, gptq = ctx.ran.get("calibrate"), ctx.ran.get("gptq")
        gram_passes = len(calibrate.chunks) if calibrate is not None else 0
        verify_fold = ctx.ran.get("verify_fold")
        fold_check = str(verify_fold.result) if verify_fold else "skipped (no flattening)"

        op_check = "skipped (--no-verify)"
        if verify:
            t = time.perf_counter()
            op_check = str(checks.check_ops(ir_model, sequences[0][:checks.OP_CHECK_TOKENS]))
            timings["op check"] = time.perf_counter() - t
            rss["op check"] = round(pipeline.peak_rss_mib(), 1)

        folds, runtime, roles = plan_counts(plan)

        t = time.perf_counter()
        with output_dir.staged(model_path, out_dir, ir_model) as (tmp_out, out_model):
            timings["save"] = time.perf_counter() - t
            rss["save"] = round(pipeline.peak_rss_mib(), 1)
            log(genai.stage_for_conversion(tmp_out, out_model.name))
            verify_msg = "skipped (--no-verify)"
            if verify:
                t = time.perf_counter()
                verify_msg = str(checks.check_logits(model_path, out_model, check_seqs,
                                                     config.scheme, prepack=plan.prepack))
                timings["verify"] = time.perf_counter() - t
                rss["verify"] = round(pipeline.peak_rss_mib(), 1)
            report = ConversionReport(
                model=str(model_path), output=str(out_dir / model_path.name), config=asdict(config),
                layers_converted=len(plan.targets), layers_by_role=roles, folds=folds,
                serq_nodes=sum(n.op_type == "SerqMatMul" for n in ir_model.graph),
                bytes_before=bytes_before, bytes_after=_dir_size(tmp_out) - sum(
                    p.stat().st_size for p in tmp_out.iterdir()
                    if p.is_file() and p.name not in {out_model.name, out_model.name + ".data"}),
                seconds=0.0, calib_tokens=calib_tokens, calib_source=source, fold_check=fold_check,
                attention=attention,
                verify=verify_msg, op_check=op_check, ranks=ranks, runtime_transforms=runtime,
                timings=timings, peak_rss_mib=rss, layers_left_float=plan.left_float,
                calibration_passes=(gram_chunks.calibration_passes(gram_passes)
                                    if calibrate is not None else 0),
                gram_passes=gram_passes,
                gram_seconds=round(getattr(gptq, "gram_seconds", 0.0), 3))
            report.seconds = time.perf_counter() - t0
            (tmp_out / CONFIG_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        return report
    finally:
        if plan.packed_store is not None:
            plan.packed_store.close()
            plan.packed_store = None


def plan_counts(plan: Plan) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Groups per fold (``"run time"`` where nothing was folded), groups per reason for a
    run-time transform, and layers per role: what the report counts."""
    folds: dict[str, int] = {}
    runtime: dict[str, int] = {}
    for g in plan.groups:
        for f in g.folded or ["run time"]:
            folds[f] = folds.get(f, 0) + 1
        if g.runtime_reason:
            runtime[g.runtime_reason] = runtime.get(g.runtime_reason, 0) + 1
    roles: dict[str, int] = {}
    for tg in plan.targets:
        roles[tg.role] = roles.get(tg.role, 0) + 1
    return folds, runtime, roles


def check_inputs(model, output, calib, calib_samples: int, calib_seqlen: int,
                 overwrite: bool, have_ids: bool = False) -> tuple[Path, Path | None]:
    """The model path and the resolved output folder (None without ``output``), after refusing
    bad files and counts."""
    model_path = Path(model)
    for flag, v in (("--calib-samples", calib_samples), ("--calib-seqlen", calib_seqlen)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SerqError(f"{flag} must be a whole number >= 1, got {v!r}")
    if not model_path.is_file():
        raise SerqError(f"model file not found: {model_path}")
    if calib is not None and not have_ids and not Path(calib).is_file():
        raise SerqError(f"calibration text file not found: {calib}")
    inputs = [model_path] + ([Path(calib)] if calib is not None and not have_ids else [])
    if output is None:
        return model_path, None
    return model_path, output_dir.check_output(output, inputs, overwrite)


def find_targets(ir_model: ir.Model, model_path: Path, config: ConvertConfig,
                 options: pipeline.Options, log=print, progress: bool = True
                 ) -> tuple[Plan, pipeline.Context]:
    """Run the structural passes (untie the head, find targets) and settle ``--lm-head auto``;
    the returned plan's config is the one the rest of the pipeline runs with."""
    plan = Plan(config)
    ctx = pipeline.Context(plan=plan, model_path=model_path, progress=progress)
    structure = [s for s in pipeline.steps_for(config, options, phase=pipeline.STRUCTURE)
                 if s.make is not None]  # attention fusion is run by the caller
    pipeline.run(structure, ir_model, ctx)
    head_found = any(t.role == "lm_head" for t in plan.targets)
    if config.lm_head == "int8" and not head_found:
        raise SerqError(f"--lm-head {config.lm_head}: the model's logits do not come from a "
                        "MatMul with a constant (or transposed constant) weight; use "
                        "--lm-head float")
    if config.lm_head == "auto":
        if not head_found:
            log("lm_head stays float: the logits do not come from a MatMul with a constant "
                "weight")
        plan.config = replace(config, lm_head="int8" if head_found else "float")
    return plan, ctx


def _calibration_sequences(ir_model: ir.Model, model_path: Path, calib, calib_samples: int,
                           calib_seqlen: int, calib_ids, log) -> tuple[list[np.ndarray], str]:
    if calib_ids is not None:
        sequences = [np.asarray(s, np.int64) for s in calib_ids]
        if not sequences or any(s.ndim != 1 or s.size == 0 for s in sequences):
            raise SerqError("calib_ids must be a non-empty list of non-empty 1-D token id arrays")
        return sequences, "given token ids"
    if calib is not None:
        ids = calibration.tokenize_file(model_path.parent, calib,
                                        max_tokens=calib_samples * calib_seqlen)
        return calibration.split_sequences(ids, calib_samples, calib_seqlen), str(calib)
    log("warning: no --calib text given; calibrating on random tokens")
    return (calibration.random_sequences(_vocab_size(ir_model), min(calib_samples, 8),
                                         min(calib_seqlen, 512)),
            "random tokens (no --calib given: accuracy will suffer)")


def with_gram_budget(config: ConvertConfig, asked: float | None, model_bytes: int
                     ) -> ConvertConfig:
    """``config`` with the Gram budget ``asked``, or where None the model's default
    (``gram_chunks.default_budget``), known only once the model is loaded."""
    if asked is not None:
        return config
    return replace(config, gram_memory_mib=gram_chunks.default_budget(model_bytes,
                                                                      config.low_memory))


def fuse_attention_structure(model: ir.Model, model_path: Path):
    """Fuse attention in ``model`` without checking it: the pass (None where nothing was
    fused), the node count before, and why not, where not."""
    from serq_onnx import passes

    done = passes.fuse_attention.already_fused(model.graph)
    if done:
        return None, 0, done
    cfg_path = model_path.parent / "config.json"
    try:
        rotary = passes.RotaryParams.from_config(json.loads(cfg_path.read_text()))
    except FileNotFoundError:
        return None, 0, f"{cfg_path.name} not found beside the model"
    except (ValueError, KeyError, TypeError) as err:
        return None, 0, f"{cfg_path.name} asks for {err}, which the fused kernel does not compute"
    nodes_before = sum(1 for _ in model.graph)
    fuse = passes.FuseAttentionPass(rotary)
    if not fuse(model).modified:
        return None, nodes_before, fuse.reason
    return fuse, nodes_before, ""


def _fuse_attention(model: ir.Model, model_path: Path, log, prepack: bool = True
                    ) -> tuple[ir.Model, str]:
    """The model with fused attention and what was done, or the model as it was and why not
    (``prepack``: the check's sessions, compare.session_options; never for FP16 graphs,
    as ``Plan.prepack``)."""
    fuse, nodes_before, why_not = fuse_attention_structure(model, model_path)
    if fuse is None:
        if nodes_before:  # the pass ran and recognised nothing
            log(f"attention stays as exported: {why_not}")
        return model, f"as exported ({why_not})"
    dtype = "float16" if fuse.dtype == ir.DataType.FLOAT16 else "float32"
    try:
        check = checks.check_attention_fusion(model_path, model, _vocab_size(model), dtype,
                                              prepack=prepack and dtype == "float32")
    except SerqError as err:
        log(f"attention stays as exported: {err}")
        original = load_model(model_path)
        pin_cache_dims(original)
        return original, f"as exported ({err})"
    return model, (f"GroupQueryAttention in {fuse.layers} layers ({nodes_before} -> "
                   f"{sum(1 for _ in model.graph)} nodes); check: {check}")


def _effective_ranks(plan: Plan, log) -> dict[str, int]:
    """Layers per effective rank: ``--rank`` is clamped to each layer's K (a rank of K already
    corrects every row); a rank no layer can take is a mistake."""
    cfg = plan.config
    asked = cfg.effective_rank
    ks = sorted({t.K for t in plan.targets if t.rank_cap is None})
    if ks and asked > ks[-1]:
        raise SerqError(f"--rank {asked} exceeds the input size K of every linear layer "
                        f"(largest K: {ks[-1]}); choose a rank <= {ks[-1]}")
    ranks: dict[str, int] = {}
    for t in plan.targets:
        key = str(t.layer_rank(cfg))
        ranks[key] = ranks.get(key, 0) + 1
    clamped = [k for k in ks if k < asked]
    if clamped:
        log(f"note: --rank {asked} exceeds K of the layers with K = "
            f"{', '.join(map(str, clamped))}; they use rank K")
    return ranks
