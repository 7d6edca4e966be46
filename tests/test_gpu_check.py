"""The GPU check's CPU-side logic: the wheel's parts (split, per-part and whole-file hashes),
the call plan's size limit, and the GPU benchmark's report and code paths rehearsed on the CPU
execution provider with tiny shapes."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402
import gpu_parts  # noqa: E402


@pytest.fixture
def fake_wheel(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8).tobytes()
    src = tmp_path / "fake-1.0-cp312-none-any.whl"
    src.write_bytes(data)
    return src, data


def test_split_and_assemble_round_trip(fake_wheel, tmp_path):
    src, data = fake_wheel
    m = gpu_parts.split(src, tmp_path / "parts", 3000)
    assert [p["size"] for p in m["parts"]] == [3000, 3000, 3000, 1000]
    assert m["size"] == len(data) and m["sha256"] == gpu_parts.sha256_file(src)
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text()) == m
    store = tmp_path / "store"
    for p in m["parts"]:
        gpu_parts.store_part(tmp_path / "parts" / p["name"], m, store)
    assert gpu_parts.present(m, store) == [p["name"] for p in m["parts"]]
    out = gpu_parts.assemble(m, store, tmp_path / "out" / src.name)
    assert out.read_bytes() == data


def test_a_part_that_is_short_corrupt_missing_or_foreign_is_refused(fake_wheel, tmp_path):
    src, _ = fake_wheel
    m = gpu_parts.split(src, tmp_path / "parts", 4096)
    store = tmp_path / "store"
    names = [p["name"] for p in m["parts"]]
    for n in names[:-1]:
        gpu_parts.store_part(tmp_path / "parts" / n, m, store)
    assert gpu_parts.present(m, store) == names[:-1]
    with pytest.raises(gpu_parts.PartError, match="missing"):
        gpu_parts.assemble(m, store, tmp_path / "w.whl")
    last = tmp_path / "parts" / names[-1]
    good = last.read_bytes()
    last.write_bytes(good[:-1])
    with pytest.raises(gpu_parts.PartError, match="bytes, expected"):
        gpu_parts.store_part(last, m, store)
    last.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(gpu_parts.PartError, match="sha256"):
        gpu_parts.store_part(last, m, store)
    other = tmp_path / "other.part01"
    other.write_bytes(b"x")
    with pytest.raises(gpu_parts.PartError, match="not a part"):
        gpu_parts.store_part(other, m, store)
    # a part corrupted after it was stored is caught when the wheel is assembled
    last.write_bytes(good)
    gpu_parts.store_part(last, m, store)
    stored = store / names[0]
    stored.write_bytes(b"\0" + stored.read_bytes()[1:])
    with pytest.raises(gpu_parts.PartError, match="sha256"):
        gpu_parts.assemble(m, store, tmp_path / "w.whl")


def test_whole_file_hash_is_checked_after_assembly(fake_wheel, tmp_path):
    src, _ = fake_wheel
    m = gpu_parts.split(src, tmp_path / "parts", 5000)
    for p in m["parts"]:
        gpu_parts.store_part(tmp_path / "parts" / p["name"], m, tmp_path / "s")
    bad = dict(m, sha256="0" * 64)
    with pytest.raises(gpu_parts.PartError, match="assembled"):
        gpu_parts.assemble(bad, tmp_path / "s", tmp_path / "w.whl")


def _fake_wheel_zip(path: Path) -> dict[str, bytes]:
    import base64
    import hashlib
    import zipfile

    files = {"pkg/__init__.py": b"x = 1\n" * 200, "pkg/lib.so": bytes(range(256)) * 40}
    def b64(d: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()

    rows = [f"{n},sha256={b64(d)},{len(d)}" for n, d in files.items()]
    rows.append("pkg-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join(rows) + "\n")
    return files


def test_lzma_repack_keeps_every_member_and_the_record_catches_a_changed_file(tmp_path):
    import zipfile

    files = _fake_wheel_zip(tmp_path / "pkg-1.0-py3-none-any.whl")
    out = gpu_parts.repack_lzma(tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "r" / "p.whl")
    with zipfile.ZipFile(out) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        assert {n: z.read(n) for n in files} == files
        z.extractall(tmp_path / "site")
    assert gpu_parts.verify_record(out, tmp_path / "site") == len(files)
    (tmp_path / "site" / "pkg" / "lib.so").write_bytes(b"changed")
    with pytest.raises(gpu_parts.PartError, match="lib.so"):
        gpu_parts.verify_record(out, tmp_path / "site")
    (tmp_path / "site" / "pkg" / "lib.so").unlink()
    with pytest.raises(gpu_parts.PartError, match="not installed"):
        gpu_parts.verify_record(out, tmp_path / "site")


def test_call_plan_carries_one_part_per_call_and_the_bundle_last():
    import gpu_check

    parts = [{"name": f"w.whl.part0{k}", "size": 1, "sha256": ""} for k in (1, 2, 3)]
    calls = gpu_check.plan_calls({"file": "w.whl", "parts": parts}, tree=1000)
    assert [c["command"].split()[-1] for c in calls] == ["1", "2", "run"]
    assert all(c["carry"][1].endswith(p["name"]) for c, p in zip(calls, parts))
    assert calls[-1]["carry"][-1] == ".gpu/bundle" and ".gpu/bundle" not in calls[0]["carry"]
    assert calls[-1]["timeout_s"] <= 600 and gpu_check.RUN_BUDGET < calls[-1]["timeout_s"]
    assert all(c["bytes"] >= 1000 for c in calls)


def _results() -> gpu_bench.Results:
    res = gpu_bench.Results(device="Test GPU X", provider="cuda", ort_version="9.9")
    for kernel, ms in (("FP16 MatMul", 2.0), ("MatMulNBits b128", 1.6),
                       ("MatMulNBits b128 fpA", 1.25), ("SerqMatMul w4a8", 1.0),
                       ("SerqMatMul w4a8 r0", 0.8), ("SerqMatMul w4a4", 0.5)):
        res.add(section="layer", K=64, N=32, M=16, kernel=kernel, ms=ms, runs=9,
                path="onnxruntime", device=res.device)
    res.add(section="graph", K=64, N=32, M=1, kernel="SerqMatMul w4a8", graph=False, ms=0.3,
            runs=5, path="onnxruntime", device=res.device)
    res.add(section="graph", K=64, N=32, M=1, kernel="SerqMatMul w4a8", graph=True, ms=0.1,
            runs=5, path="onnxruntime", device=res.device)
    res.skipped.append("layers 14336x4096 M=8192 FP16 MatMul (time budget)")
    return res


def test_report_has_ratios_the_device_and_the_skips():
    md = gpu_bench.format_markdown(_results())
    row = next(line for line in md.splitlines() if line.startswith("| 64x32 | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # FP16/w4a8, FP16/w4a4, best MatMulNBits/w4a8, R cost, path, device
    assert cells[-6:] == ["2.00", "4.00", "1.25", "+25.0%", "onnxruntime", "Test GPU X"]
    graph = next(line for line in md.splitlines() if line.startswith("| 64x32 | 1 |"))
    assert "| 3.00 |" in graph and graph.rstrip(" |").endswith("Test GPU X")
    assert "- layers 14336x4096 M=8192 FP16 MatMul (time budget)" in md
    # M=16 is neither a prefill nor a decode target size: only the R cost (+25% > 8%) is judged
    targets = [line for line in md.splitlines() if line.startswith("| salient R cost")]
    assert targets == ["| salient R cost | 64x32 | 16 | +25.0% | <= 8% | NO | Test GPU X |"]


def test_targets_are_judged_on_the_measured_ratios():
    res = gpu_bench.Results(device="G", provider="cuda", ort_version="x")
    for M, fp16, nbits, ours in ((1, 3.5, 1.2, 1.0), (2048, 1.5, 2.0, 1.0)):
        for kernel, ms in (("FP16 MatMul", fp16), ("MatMulNBits b128", nbits),
                           ("SerqMatMul w4a8", ours), ("SerqMatMul w4a8 r0", 0.95)):
            res.add(section="layer", K=8, N=8, M=M, kernel=kernel, ms=ms, runs=5,
                    path="onnxruntime", device="G")
    met = {tuple(c.strip() for c in line.strip("|").split("|"))[:6:5]
           for line in gpu_bench.format_markdown(res).splitlines()
           if line.startswith(("| prefill", "| decode", "| salient"))}
    assert met == {("decode vs FP16 MatMul", "yes"), ("decode vs best MatMulNBits", "yes"),
                   ("prefill vs FP16 MatMul", "NO"), ("prefill vs best MatMulNBits", "yes"),
                   ("salient R cost", "yes")}


def test_json_holds_every_figure(tmp_path):
    res = _results()
    md, js = gpu_bench.write(res, tmp_path)
    data = json.loads(js.read_text())
    assert data["device"] == "Test GPU X" and len(data["rows"]) == len(res.rows)
    assert md.read_text() == gpu_bench.format_markdown(res)


def test_a_budget_of_nothing_skips_every_case_and_says_so(tmp_path):
    res = gpu_bench.Results(device="d", provider="cpu", ort_version="x")
    gpu_bench.bench_layers(res, [(64, 32), (32, 16)], [1, 2], gpu_bench.Budget(0),
                           min_seconds=0.01, quick=True)
    assert not res.rows
    assert res.skipped == ["layers 64x32: all M (time budget)", "layers 32x16: all M (time budget)"]


@pytest.fixture(scope="module")
def carried_models(tiny_llama_fp16, tmp_path_factory):
    """The tiny Llama laid out as the check carries it: fp16 export and its w4a8 conversion."""
    from serq_onnx.converter import convert

    root = tmp_path_factory.mktemp("models")
    fp16 = root / "tiny-llama" / "fp16"
    fp16.mkdir(parents=True)
    for f in tiny_llama_fp16.onnx_path.parent.iterdir():
        (fp16 / f.name).symlink_to(f)
    rng = np.random.default_rng(1)
    calib = [rng.integers(0, 300, size=32, dtype=np.int64) for _ in range(2)]
    convert(fp16 / "model.onnx", root / "tiny-llama" / "serq-w4a8", scheme="w4a8",
            calib_ids=calib, rank=32, group_w=32, group_a=32, weight_quant="rtn",
            weight_scale="absmax", verify=False, progress=False, log=lambda *a: None)
    return root


def test_cpu_rehearsal_runs_every_onnxruntime_code_path(carried_models, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_bench, "REHEARSE_SHAPES", [(96, 40)])
    monkeypatch.setattr(gpu_bench, "REHEARSE_MS", [1, 5])
    args = Namespace(out=str(tmp_path), provider="cuda", rehearse=True,
                     models=str(carried_models), steps="correctness,layers,model,graphs",
                     budget=120.0, min_seconds=0.01)
    res = gpu_bench.run(args)
    assert res.provider == "cpu" and res.device.startswith("CPU rehearsal")
    layer = {(r["kernel"], r["M"]) for r in res.rows if r["section"] == "layer"}
    kernels = set(gpu_bench.layer_kernels(np.zeros((96, 40), np.float32), quick=True))
    assert layer == {(k, m) for k in kernels for m in (1, 5)}
    assert all(r["ms"] > 0 for r in res.rows if "ms" in r)
    corr = [r for r in res.rows if r["section"] == "correctness"]
    assert len(corr) == 2 and all(r["rel_rms"] == 0 and r["within"] for r in corr)  # CPU vs CPU
    phases = {(r["model"], r["phase"]) for r in res.rows if r["section"] == "model"}
    assert len(phases) == 4 and any("decode" in p for _, p in phases)
    assert res.skipped == ["cuda graphs: all (they need the CUDA execution provider)"]
    report = (tmp_path / "gpu_bench.md").read_text()
    assert "SerqMatMul w4a4" in report and res.device in report
    assert os.environ.get(gpu_bench.FPA_ENV) is None  # the fpA switch never leaks


def test_cpu_rehearsal_of_the_triton_fallback(tmp_path):
    """The path taken without onnxruntime-gpu: the kernels' launcher against torch's matmul,
    here under Triton's interpreter, in a child process (an interpreted Triton cannot share a
    process with one that compiles)."""
    import subprocess

    r = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "gpu_bench.py"),
                        "--rehearse", "--steps", "triton", "--out", str(tmp_path),
                        "--budget", "60", "--min-seconds", "0.01"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = [x for x in data["rows"] if x["section"] == "triton"]
    shapes, ms = gpu_bench.REHEARSE_TRITON
    kernels = {"torch FP16 matmul", "SerqMatMul w4a8", "SerqMatMul w4a8 r0", "SerqMatMul w4a4"}
    assert {(x["kernel"], x["M"]) for x in rows} == {(k, m) for k in kernels for m in ms}
    assert all(x["path"] == "triton+torch" and x["ms"] > 0 for x in rows), data["skipped"]
    assert "Triton launcher against torch" in (tmp_path / "gpu_bench.md").read_text()


def test_without_serqmatmul_figures_the_triton_path_is_taken(tmp_path, monkeypatch):
    """When every SerqMatMul session fails in onnxruntime, the same run times its kernels
    through the Triton launcher instead, and says so."""
    def broken(*a, **k):
        raise RuntimeError("no SerqMatMul kernel for this provider")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_bench, "serq_matmul", broken)
    monkeypatch.setattr(gpu_bench, "REHEARSE_SHAPES", [(64, 32)])
    monkeypatch.setattr(gpu_bench, "REHEARSE_MS", [1])
    monkeypatch.setattr(gpu_bench, "REHEARSE_TRITON", ([(64, 32)], [1]))
    args = Namespace(out=str(tmp_path), provider="cuda", rehearse=True, models=None,
                     steps="layers", budget=60.0, min_seconds=0.01)
    res = gpu_bench.run(args)
    assert {r["kernel"] for r in res.rows if r["section"] == "layer"} == {
        "FP16 MatMul", "MatMulNBits b128", "MatMulNBits b128 fpA"}
    assert any("session failed: no SerqMatMul kernel" in s for s in res.skipped)
    assert any(n.startswith("no SerqMatMul figure through onnxruntime") for n in res.notes)
    assert any(n.startswith("step triton:") for n in res.notes)
