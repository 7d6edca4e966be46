"""``convert()``: the SERQ pipeline over an ONNX model, written atomically to an output folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import calibration, compare
from .errors import SerqError
from .modelio import load_model, model_nbytes, save_model
from .plan import ConvertConfig, Plan

CONFIG_FILE = "serq_config.json"


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
    verify: str = ""
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        roles = ", ".join(f"{k} {v}" for k, v in sorted(self.layers_by_role.items()))
        mb = 1024 * 1024
        return "\n".join([
            f"converted {self.layers_converted} linear layers to SerqMatMul ({roles}) in "
            f"{self.serq_nodes} nodes" + (" (layers reading the same activation share one)"
                                         if self.serq_nodes < self.layers_converted else ""),
            f"scheme {self.config['scheme']}, method {self.config['method']}, rank "
            f"{self.config['rank']}, groups w{self.config['group_w']}/a{self.config['group_a']}, "
            f"main weight {self.config.get('weight_quant', 'rtn')} with "
            f"{self.config.get('weight_scale', 'absmax')} scales",
            f"calibration: {self.calib_tokens} tokens from {self.calib_source}",
            f"folds: {', '.join(f'{k} x{v}' for k, v in sorted(self.folds.items())) or 'none'}",
            f"fold check (float graph after folding vs original): {self.fold_check}",
            f"verify (converted vs float): {self.verify}",
            f"size: {self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB "
            f"({self.bytes_after / max(self.bytes_before, 1):.1%})",
            f"time: {self.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in self.timings.items())})",
            f"output: {self.output}",
        ])


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _model_files(model_path: Path) -> set[Path]:
    """The model file and its external data files (not copied as 'other files')."""
    files = {model_path}
    for p in model_path.parent.iterdir():
        if p.is_file() and (p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".onnx.data")
                            or p.name.startswith(model_path.name + "_data")):
            files.add(p)
    return files


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise SerqError(f"output folder {out_dir} exists and is not empty; choose another "
                            "or pass --overwrite")
    if not out_dir.parent.exists():
        raise SerqError(f"the parent folder of {out_dir} does not exist")


def _stage_output(model_path: Path, out_dir: Path, model: ir.Model) -> tuple[Path, Path]:
    """A temporary folder beside ``out_dir`` with ``model`` saved under the input's file name
    and every side file of the input folder; ``_commit`` moves it into place."""
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        skip = _model_files(model_path)
        for p in model_path.parent.iterdir():
            if p.is_file() and p not in skip:
                shutil.copy2(p, tmp_out / p.name)
        out_model = tmp_out / model_path.name
        save_model(model, out_model)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    return tmp_out, out_model


def _commit(tmp_out: Path, out_dir: Path) -> None:
    """Move the finished folder into place; the old one is removed only once the new one is in."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        out_dir.rename(old)
    tmp_out.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _vocab_size(model: ir.Model) -> int:
    for out in model.graph.outputs:
        if out.name == "logits" and out.shape is not None and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return 32000


def convert(model: str | os.PathLike, output: str | os.PathLike, *, scheme: str = "w4a8",
            rank: int = 128, group_w: int = 128, group_a: int | None = None, method: str = "serq",
            calib: str | os.PathLike | None = None, calib_samples: int = 128,
            calib_seqlen: int = 2048, calib_ids: list[np.ndarray] | None = None,
            weight_quant: str | None = None, weight_scale: str | None = None, fuse: bool = True,
            verify: bool = True, overwrite: bool = False, progress: bool = True,
            smooth_alpha: float = 0.5, log=print) -> ConversionReport:
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
    SERQ, for comparison.
    """
    from serq_onnx import passes

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    model_path, out_dir = Path(model), Path(output)
    config = ConvertConfig(scheme=scheme, rank=rank, group_w=group_w, group_a=group_a,
                           method=method, weight_quant=weight_quant, weight_scale=weight_scale,
                           smooth_alpha=smooth_alpha)
    if not model_path.is_file():
        raise SerqError(f"model file not found: {model_path}")
    if out_dir.resolve() == model_path.parent.resolve():
        raise SerqError("the output folder must differ from the model's folder")
    _prepare_output(out_dir, overwrite)

    ir_model = load_model(model_path)
    bytes_before = model_nbytes(ir_model)
    plan = Plan(config)
    passes.FindTargetsPass(plan)(ir_model)

    if calib_ids is not None:
        sequences, source = [np.asarray(s, np.int64) for s in calib_ids], "given token ids"
    elif calib is not None:
        ids = calibration.tokenize_file(model_path.parent, calib,
                                        max_tokens=calib_samples * calib_seqlen)
        sequences = calibration.split_sequences(ids, calib_samples, calib_seqlen)
        source = str(calib)
    else:
        sequences = calibration.random_sequences(_vocab_size(ir_model), min(calib_samples, 8),
                                                 min(calib_seqlen, 512))
        source = "random tokens (no --calib given: accuracy will suffer)"
        log("warning: no --calib text given; calibrating on random tokens")
    calib_tokens = int(sum(len(s) for s in sequences))
    check_seqs = [s[:128] for s in sequences[:2]]

    t = time.perf_counter()
    if config.needs_calibration:
        passes.CalibratePass(plan, sequences, progress=progress)(ir_model)
    timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    passes.FoldFlatteningPass(plan)(ir_model)
    passes.PermuteWeightsPass(plan)(ir_model)
    fold_check = "skipped (no flattening)"
    if config.flattens:
        vf = passes.VerifyFoldPass(model_path, check_seqs)
        vf(ir_model)
        fold_check = str(vf.result)
    timings["folding"] = time.perf_counter() - t

    t = time.perf_counter()
    passes.SalientReconstructionPass(plan)(ir_model)
    if config.weight_quant == "gptq":
        tq = time.perf_counter()
        passes.GPTQPass(plan, progress=progress)(ir_model)
        timings["gptq"] = time.perf_counter() - tq
    else:
        passes.QuantizeWeightsPass(plan, progress=progress)(ir_model)
    if config.method == "l2qer":
        passes.LowRankFactorsPass(plan)(ir_model)
    passes.ReplaceMatMulPass(plan)(ir_model)
    if config.method == "l2qer":
        passes.LowRankBranchPass(plan)(ir_model)
    if fuse:
        passes.FuseSiblingsPass(plan)(ir_model)
    passes.CleanupPass()(ir_model)
    timings["quantization"] = time.perf_counter() - t - timings.get("gptq", 0.0)

    folds: dict[str, int] = {}
    for g in plan.groups:
        for f in g.folded or ["run time"]:
            folds[f] = folds.get(f, 0) + 1
    roles: dict[str, int] = {}
    for tg in plan.targets:
        roles[tg.role] = roles.get(tg.role, 0) + 1

    t = time.perf_counter()
    tmp_out, out_model = _stage_output(model_path, out_dir, ir_model)
    timings["save"] = time.perf_counter() - t
    try:
        verify_msg = "skipped"
        if verify:
            t = time.perf_counter()
            ref = compare.cpu_session(model_path)
            got = compare.cpu_session(out_model, with_ops=True)
            d = compare.diff(np.concatenate([compare.logits(got, s) for s in check_seqs], 1),
                             np.concatenate([compare.logits(ref, s) for s in check_seqs], 1))
            if not np.isfinite(d.max_abs):
                raise SerqError(f"the converted model produces non-finite logits ({d})")
            verify_msg = str(d)
            timings["verify"] = time.perf_counter() - t
        report = ConversionReport(
            model=str(model_path), output=str(out_dir / model_path.name), config=asdict(config),
            layers_converted=len(plan.targets), layers_by_role=roles, folds=folds,
            serq_nodes=sum(n.op_type == "SerqMatMul" for n in ir_model.graph),
            bytes_before=bytes_before, bytes_after=_dir_size(tmp_out) - sum(
                p.stat().st_size for p in tmp_out.iterdir()
                if p.is_file() and p.name not in {out_model.name, out_model.name + ".data"}),
            seconds=0.0, calib_tokens=calib_tokens, calib_source=source, fold_check=fold_check,
            verify=verify_msg, timings=timings)
        report.seconds = time.perf_counter() - t0
        (tmp_out / CONFIG_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        _commit(tmp_out, out_dir)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    return report
