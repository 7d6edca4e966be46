"""``gpu_check.py dry-run`` on the CPU machine: the device calls rehearsed, in order, up to
where a GPU is needed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import (LIMIT, MARGIN, PREP, ROOT, RUN_BUDGET, _manifest, find_python312,
                       gpu_env, log, part, plan_calls, print_calls, run, tree_size)

def dry_run(args) -> int:
    """The device calls on this machine, in order, with a temporary folder as the GPU's store:
    the parts, then ``run`` rehearsed (wheel installed with Python 3.12 as there, tests and
    benchmark on the CPU execution provider), then what only this machine can check: the
    wheel imports under Python 3.12, the package compiles under it, the big model loads."""
    manifest = _manifest()
    calls = plan_calls(manifest, tree_size())
    over = [c["call"] for c in calls if c["bytes"] > LIMIT - MARGIN]
    timings: dict[str, float] = {}
    py312 = find_python312()
    out = PREP / "dry-run"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="serq-gpu-dry-") as tmp:
        store = Path(tmp)
        for k in range(1, len(manifest["parts"])):
            t = time.perf_counter()
            part(k, store)
            timings[f"call {k}: part {k}"] = time.perf_counter() - t
        t = time.perf_counter()
        rargs = argparse.Namespace(budget=RUN_BUDGET, out=str(out), python=sys.executable,
                                   install_python=py312, rehearse=True)
        if not py312:  # the wheel is cp312: this machine's pip cannot install it otherwise
            log("SKIPPED: no Python 3.12 here; the run's install step will fail in rehearsal")
        rc = run(rargs, store)
        timings[f"call {len(calls)}: run (rehearsed)"] = time.perf_counter() - t
        for s in json.loads((out / "check.json").read_text()):
            print(f"    {s['step']:24s} {s['status']:18s} {s['seconds']:6.1f} s")
        site = store / "site"
        if py312 and site.is_dir():
            t = time.perf_counter()
            deps = sorted((PREP / "dl-rehearse").glob("*.whl"))
            if deps:  # numpy etc. for 3.12, which the GPU machine has and this 3.12 lacks
                subprocess.run([py312, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--disable-pip-version-check", "--target", str(site),
                                *map(str, deps)], check=True)
            op_model = write_op_model(store / "op.onnx")
            lib = store / "pkg" / "serq_onnx" / "lib" / "libserq_onnx_ops.so"
            carried = sorted(map(str, (store / "models").glob("*/*/model.onnx")))
            imp = subprocess.run([py312, "-c", IMPORT_CHECK, str(op_model), str(lib), *carried],
                                 env={**os.environ, "PYTHONPATH": str(site)},
                                 capture_output=True, text=True)
            log(f"onnxruntime-gpu under Python 3.12: "
                f"{imp.stdout.strip() or imp.stderr.strip()[-400:]}")
            if "FAILS" in imp.stdout or imp.returncode:
                rc = 1
            comp = subprocess.run([py312, "-m", "compileall", "-q", str(store / "pkg")],
                                  capture_output=True, text=True)
            log(f"package byte-compiles under Python 3.12: {comp.returncode == 0}")
            timings["import under Python 3.12"] = time.perf_counter() - t
        else:
            log("SKIPPED: import of onnxruntime-gpu under Python 3.12 (none here)")
        big = store / "models" / "smollm2-shaped" / "serq-w4a8" / "model.onnx"
        t = time.perf_counter()
        chk = subprocess.run([sys.executable, "-P", "-c", LOAD_CHECK, str(big)],
                             env=gpu_env(None, store / "pkg"), capture_output=True, text=True,
                             timeout=300)
        log(f"smollm2-shaped serq model on the CPU: {chk.stdout.strip() or chk.stderr[-300:]}")
        timings["smollm2-shaped serq model loads"] = time.perf_counter() - t
    print("\nRehearsed steps (this machine):")
    for k, v in timings.items():
        print(f"  {k:40s} {v:7.1f} s")
    print(f"rehearsal report: {out}/RESULTS-gpu.md")
    print_calls(calls)
    if over:
        print(f"CALLS OVER THE LIMIT: {over}")
        return 1
    print("\nSTOP: the next step needs a GPU: the device calls above, in order "
          "(docs/gpu-check.md).")
    return rc


IMPORT_CHECK = r"""
import sys, numpy as np, onnxruntime as o
print(o.__version__, o.get_available_providers())
so = o.SessionOptions()
so.register_custom_ops_library(sys.argv[2])
try:
    s = o.InferenceSession(sys.argv[1], so,
                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    y = s.run(None, {"A": np.ones((3, 256), np.float16)})[0]
    print("the op library loads; a SerqMatMul session runs on", s.get_providers(), y.shape)
except Exception as e:
    print("SerqMatMul session FAILS:", str(e)[-300:])
for path in sys.argv[3:]:
    try:
        o.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        print("loads:", path.split("models/")[-1])
    except Exception as e:
        print("model FAILS to load:", path, str(e)[-300:])
"""


def write_op_model(path: Path) -> Path:
    """A one-node FP16 SerqMatMul model (the benchmark's builder), for other Pythons to load."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np

    import gpu_bench

    w = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32) / 16
    path.write_bytes(gpu_bench.serq_matmul(w, bits_a=8, rank=32))
    return path


LOAD_CHECK = r"""
import sys, numpy as np
import serq_onnx
from serq_onnx import compare
s = serq_onnx.session(sys.argv[1])
print("ok, logits", compare.logits(s, np.arange(8, dtype=np.int64)).shape)
"""
