"""The GPU benchmark's report: the figures as JSON and as markdown tables, the device's name
and each figure's path beside every one of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# CUDA against CPU logits, as tests/test_cuda_ep_gpu.py's whole-model test states them.
CORRECT = {"rel_rms": 1e-3, "top1": 0.98}


@dataclass
class Results:
    """Every figure of one run (rows), and what was skipped and why."""

    device: str
    provider: str
    ort_version: str
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num and den else "–"


def _layer_table(res: Results, section: str, title: str, base: str) -> list[str]:
    layer = [r for r in res.rows if r["section"] == section]
    if not layer:
        return []
    dev = res.device
    kernels = list(dict.fromkeys(r["kernel"] for r in layer))
    cells = {(r["K"], r["N"], r["M"], r["kernel"]): r for r in layer}
    nbits = [k for k in kernels if k.startswith("MatMulNBits")]
    out = [f"## {title}", "",
           "| K x N | M | " + " | ".join(kernels) + f" | {base} / w4a8 | {base} / w4a4 | "
           "best MatMulNBits / w4a8 | R cost (w4a8 / r0 - 1) | path | device |",
           "| --- | --- | " + " | ".join("---" for _ in kernels) + " | --- | --- | --- | "
           "--- | --- | --- |"]
    for K, N, M in dict.fromkeys((r["K"], r["N"], r["M"]) for r in layer):
        ms = {k: cells[(K, N, M, k)]["ms"] for k in kernels if (K, N, M, k) in cells}
        ours, a4, r0 = (ms.get(k) for k in ("SerqMatMul w4a8", "SerqMatMul w4a4",
                                            "SerqMatMul w4a8 r0"))
        best_nb = min((ms[k] for k in nbits if k in ms), default=None)
        r_cost = f"{(ours / r0 - 1) * 100:+.1f}%" if ours and r0 else "–"
        paths = "/".join(sorted({cells[(K, N, M, k)]["path"] for k in ms}))
        out.append(f"| {K}x{N} | {M} | " + " | ".join(
            f"{ms[k]:.4f}" if k in ms else "–" for k in kernels)
            + f" | {_ratio(ms.get(base), ours)} | {_ratio(ms.get(base), a4)} | "
            f"{_ratio(best_nb, ours)} | {r_cost} | {paths} | {dev} |")
    return out + [""]


# Issue 16's per-layer targets: (name, rows M, baseline, minimum baseline / w4a8 ratio).
TARGETS = [("prefill vs FP16 MatMul", (2048, 8192), "FP16 MatMul", 1.6),
           ("prefill vs best MatMulNBits", (2048, 8192), "MatMulNBits", 1.0),
           ("decode vs FP16 MatMul", (1,), "FP16 MatMul", 3.0),
           ("decode vs best MatMulNBits", (1,), "MatMulNBits", 1.0)]
R_COST_MAX = 0.08


def targets_table(res: Results) -> list[str]:
    """Each target against the measured onnxruntime figures (w4a8), per shape and M."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in res.rows:
        if r["section"] == "layer":
            cells.setdefault((r["K"], r["N"], r["M"]), {})[r["kernel"]] = r["ms"]
    rows = []
    for (K, N, M), ms in cells.items():
        ours = ms.get("SerqMatMul w4a8")
        if not ours:
            continue
        for name, m_set, base, need in TARGETS:
            if M not in m_set:
                continue
            nb = [v for k, v in ms.items() if k.startswith("MatMulNBits")]
            b = min(nb) if base == "MatMulNBits" and nb else ms.get(base)
            if b:
                rows.append(f"| {name} | {K}x{N} | {M} | {b / ours:.2f} | >= {need:g} | "
                            f"{'yes' if b / ours >= need else 'NO'} | {res.device} |")
        r0 = ms.get("SerqMatMul w4a8 r0")
        if r0:
            cost = ours / r0 - 1
            rows.append(f"| salient R cost | {K}x{N} | {M} | {cost * 100:+.1f}% | "
                        f"<= {R_COST_MAX:.0%} | {'yes' if cost <= R_COST_MAX else 'NO'} | "
                        f"{res.device} |")
    if not rows:
        return []
    return ["## Targets (issue 16), from the figures above", "",
            "| target | K x N | M | measured | needed | met | device |",
            "| --- | --- | --- | --- | --- | --- | --- |"] + rows + [""]


def format_markdown(res: Results) -> str:
    """The report: one table per section, the device and path beside every figure."""
    dev = res.device
    out = [f"Device: **{dev}**; execution provider: {res.provider}; onnxruntime "
           f"{res.ort_version}. Times: median milliseconds per call. Ratios: baseline / "
           "SerqMatMul w4a8 (> 1: SerqMatMul is faster).", ""]
    corr = [r for r in res.rows if r["section"] == "correctness"]
    if corr:
        out += ["## Correctness: this device against the CPU", "",
                f"Within: relative RMS < {CORRECT['rel_rms']:g} and top-1 agreement >= "
                f"{CORRECT['top1']:.0%}.", "",
                "| model | relative RMS | max abs | top-1 agreement | within | path | device |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['model']} | {r['rel_rms']:.3g} | {r['max_abs']:.3g} | "
                f"{r['top1_agree']:.1%} | {'yes' if r['within'] else 'NO'} | {r['path']} | "
                f"{r['device']} |" for r in corr]
        out.append("")
    out += _layer_table(res, "layer", "Per layer, onnxruntime (FP16 activations)", "FP16 MatMul")
    out += _layer_table(res, "triton", "Per layer, Triton launcher against torch (FP16 "
                        "activations)", "torch FP16 matmul")
    out += targets_table(res)
    graph = [r for r in res.rows if r["section"] == "graph"]
    if graph:
        cells = {(r["K"], r["N"], r["M"], r["kernel"], r["graph"]): r["ms"] for r in graph}
        out += ["## CUDA graph capture (decode sizes)", "",
                "| K x N | M | kernel | graph off | graph on | off / on | path | device |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for K, N, M, k in dict.fromkeys((r["K"], r["N"], r["M"], r["kernel"]) for r in graph):
            off, on = cells.get((K, N, M, k, False)), cells.get((K, N, M, k, True))
            out.append(f"| {K}x{N} | {M} | {k} | {off or 0:.4f} | {on or 0:.4f} | "
                       f"{_ratio(off, on)} | onnxruntime | {dev} |")
        out.append("")
    model = [r for r in res.rows if r["section"] == "model"]
    if model:
        out += ["## Whole model (batch 1)", "",
                "| model | phase | ms | runs | path | device |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['model']} | {r['phase']} | {r['ms']:.3f} | {r['runs']} | {r['path']} | "
                f"{r['device']} |" for r in model]
        out.append("")
    out += ["## Skipped", ""] + ([f"- {s}" for s in res.skipped] or ["- nothing"]) + [""]
    if res.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    return "\n".join(out)


def write(res: Results, out_dir: Path, stem: str = "gpu_bench") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(format_markdown(res))
    js.write_text(res.to_json())
    return md, js
