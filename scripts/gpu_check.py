"""The GPU check: onnxruntime-gpu brought over in parts, the gpu tests, the GPU benchmark.

The GPU machine has no network and takes at most 64 MiB per call (working tree included), and
``onnxruntime-gpu`` is larger than that, so the check is a short series of device calls:

* ``prep`` (here): download the wheel, split it into parts, copy the built package (Python plus
  the op library with its CUDA part), build and compress the benchmark's models, and plan the
  calls so that each one fits; prints the calls.
* ``part K`` (GPU): store part K in ``/tmp/serq-gpu`` (it lasts while the machine stays warm),
  checking its hash.
* ``run`` (GPU): store the last part, assemble and check the wheel, install it with
  ``pip --target``, run ``pytest -m gpu`` and ``benchmarks/gpu_bench.py`` inside a time budget,
  and write ``RESULTS-gpu.md`` and the raw JSON into ``$OUT``. Without a working CUDA provider
  the benchmark times the Triton launcher against torch instead, and says so.
* ``dry-run`` (here): every step above on this machine, stopping where a GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_parts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREP = ROOT / ".gpu"
PARTS = PREP / "parts"
BUNDLE = PREP / "bundle"
STORE = Path(os.environ.get("SERQ_GPU_STORE", "/tmp/serq-gpu"))
ORT_GPU = "onnxruntime-gpu==1.31.1"
LIMIT = 64 * 2**20  # one device call's transfer: working tree + carried paths
MARGIN = 2 * 2**20  # room for files other engineers add to the tree meanwhile
PART_SIZE = 58 * 2**20
RUN_BUDGET = 420  # seconds inside the 600 s call limit, for install + tests + benchmark
PYTEST_LIMIT = 150
REHEARSAL_DEPS = ["numpy", "flatbuffers", "packaging", "protobuf"]
GPU_TESTS = ["tests/test_kernels_gpu.py", "tests/test_cuda_ep_gpu.py"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def tree_size() -> int:
    """Bytes of what every call sends: tracked and untracked, not ignored files, and shared/."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    files = [ROOT / f for f in out.split("\0") if f]
    shared = ROOT / "shared"
    if shared.is_dir():
        files += [p for p in shared.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files if f.is_file())


def path_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*")
                                                    if f.is_file())


def plan_calls(manifest: dict, tree: int) -> list[dict]:
    """One call per part; the last also carries the bundle and runs the check."""
    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731
    calls = []
    n = len(manifest["parts"])
    for k, part in enumerate(manifest["parts"], start=1):
        carry = [rel(PARTS / "manifest.json"), rel(PARTS / part["name"])]
        if k < n:
            command = f"python3 scripts/gpu_check.py part {k}"
            timeout = 120
        else:
            carry.append(rel(BUNDLE))
            command = "PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py run"
            timeout = 560
        size = tree + sum(path_size(ROOT / c) for c in carry)
        calls.append({"call": k, "command": command, "carry": carry, "timeout_s": timeout,
                      "bytes": size})
    return calls


def print_calls(calls: list[dict]) -> None:
    print(f"\nThe GPU check takes {len(calls)} device calls, in one warm lease "
          "(each within 30 s of the last):")
    for c in calls:
        print(f"  {c['call']}. run command={c['command']!r} carry={c['carry']} "
              f"timeout_s={c['timeout_s']}   ({mib(c['bytes'])} sent)")


def find_python312() -> str | None:
    for cand in ("python3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12"):
        path = shutil.which(cand) or (cand if Path(cand).is_file() else None)
        if path and subprocess.run([path, "-c", "import sys"], capture_output=True).returncode == 0:
            return path
    found = sorted(Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12"))
    return str(found[0]) if found else None


# -- on the GPU machine -----------------------------------------------------------------------

def _manifest() -> dict:
    return json.loads((PARTS / "manifest.json").read_text())


def store_carried(manifest: dict, parts_dir: Path) -> list[str]:
    """Store every carried part (checked) into ``parts_dir``; returns the names stored."""
    got = []
    for p in manifest["parts"]:
        if (PARTS / p["name"]).is_file():
            gpu_parts.store_part(PARTS / p["name"], manifest, parts_dir)
            got.append(p["name"])
    return got


def part(k: int, store: Path = STORE) -> int:
    manifest = _manifest()
    name = gpu_parts.part_name(manifest["file"], k)
    gpu_parts.store_part(PARTS / name, manifest, store / "parts")
    have = gpu_parts.present(manifest, store / "parts")
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in have]
    log(f"stored {name}; present {len(have)}/{len(manifest['parts'])}; missing {missing}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
    except OSError:
        smi = "no nvidia-smi"
    log(f"GPU: {smi.strip()}; python {sys.version.split()[0]}")
    return 0


def cuda_lib_dirs() -> list[str]:
    """The ``lib`` folders of the ``nvidia-*`` packages beside torch (cuBLAS, cuDNN, runtime)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs: list[str] = []
    for root in (spec.submodule_search_locations if spec else []):
        dirs += sorted(str(d) for d in Path(root).glob("**/lib") if any(d.glob("*.so*")))
    return dirs


def install(wheel: Path, site: Path, python: str = sys.executable) -> None:
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--disable-pip-version-check", "--target", str(site),
                    str(wheel)], check=True)


PROBE = r"""
import json, sys
try:
    import torch  # loads the CUDA libraries of the nvidia-* packages first
except ImportError:
    torch = None
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
info = {"ort": ort.__version__, "ort_file": ort.__file__,
        "providers": ort.get_available_providers()}
g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "p",
    [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 2]),
     helper.make_tensor_value_info("B", TensorProto.FLOAT, [2, 2])],
    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)],
                      ir_version=10).SerializeToString()
try:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    s = ort.InferenceSession(m, so, providers=["CUDAExecutionProvider"])
    info["session_providers"] = s.get_providers()
    info["cuda_ok"] = "CUDAExecutionProvider" in s.get_providers()
except Exception as e:
    info["cuda_ok"] = False
    info["cuda_error"] = str(e).splitlines()[0][:300]
print("PROBE " + json.dumps(info))
"""


def probe(env: dict, python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE ")]
    if not line:
        return {"cuda_ok": False, "cuda_error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(line[0][6:])


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output both shown and saved; rc 124 when it ran out of time."""
    t = time.perf_counter()
    with open(log_path, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            for line in p.stdout:
                sys.stdout.write(line)
                f.write(line)
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            f.write(f"\n[killed after {timeout:.0f} s]\n")
            rc = 124
    return rc, time.perf_counter() - t


def gpu_env(site: Path | None, pkg: Path) -> dict:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(pkg)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    libs = cuda_lib_dirs()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(
        os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def results_header(steps: list[dict], device: str) -> str:
    lines = ["# SerqMatMul on a GPU: results of `scripts/gpu_check.py run`", "",
             f"Written by the check on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"on **{device}**. Every figure below was measured in that run.", "",
             "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s.get('detail', '')} |"
              for s in steps]
    return "\n".join(lines) + "\n\n"


def run(args, store: Path = STORE) -> int:
    """Everything after the parts, inside ``args.budget`` seconds. ``args.rehearse``: this
    machine's Python runs the tests and the benchmark (CPU execution provider), the wheel is
    installed with ``args.install_python`` but not put on its path."""
    t0 = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or (store / "out"))
    out.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    def step(name, status, t, detail=""):
        steps.append({"step": name, "status": status, "seconds": time.perf_counter() - t,
                      "detail": detail})
        log(f"{name}: {status} {detail}")
        (out / "check.json").write_text(json.dumps(steps, indent=1) + "\n")

    left = lambda: args.budget - (time.perf_counter() - t0)  # noqa: E731
    site = store / "site"
    ort_ok = False
    t = time.perf_counter()
    try:
        manifest = _manifest()
        got = store_carried(manifest, store / "parts")
        wheel = gpu_parts.assemble(manifest, store / "parts", store / "wheel" / manifest["file"])
        step("assemble", "ok", t, f"stored {got}; {manifest['file']} {mib(manifest['size'])}, "
             "sha256 matches")
        t = time.perf_counter()
        install(wheel, site, args.install_python or args.python)
        n = gpu_parts.verify_record(wheel, site)
        step("install", "ok", t, f"pip --target {site}; {n} files match the wheel's RECORD")
        ort_ok = True
    except Exception as e:  # noqa: BLE001 -- any failure here means: take the Triton path
        step("assemble/install", "failed", t, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    t = time.perf_counter()
    pkg = store / "pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(BUNDLE / "pkg", pkg)
    models = store / "models"
    if (BUNDLE / "models.tar.xz").is_file():
        shutil.rmtree(models, ignore_errors=True)
        with tarfile.open(BUNDLE / "models.tar.xz") as tar:
            tar.extractall(models, filter="data")
    step("bundle", "ok", t, f"package and models in {store}")
    env = gpu_env(site if ort_ok and not args.rehearse else None, pkg)
    if (BUNDLE / "aot" / "manifest.json").is_file():
        env["SERQ_KERNELS_AOT_DIR"] = str(BUNDLE / "aot")
    t = time.perf_counter()
    info = probe(env, args.python)
    cuda = bool(info.get("cuda_ok")) and ort_ok and not args.rehearse
    step("probe", "ok" if cuda else "no CUDA provider", t, json.dumps(info)[:400])
    t = time.perf_counter()
    rc, _ = run_logged([args.python, "-P", "-m", "pytest", "-m", "gpu", "-q", "-rs",
                        "-p", "no:cacheprovider", *GPU_TESTS], env, out / "pytest.log",
                       min(PYTEST_LIMIT, max(10.0, left() * 0.35)))
    tail = (out / "pytest.log").read_text().strip().splitlines()[-1:] or [""]
    step("pytest -m gpu", {0: "passed", 124: "timed out", 5: "none ran"}.get(rc, f"rc {rc}"), t,
         tail[0][:300])
    t = time.perf_counter()
    bench_budget = left() - 25
    steps_arg = "correctness,layers,model,graphs" if cuda else "triton"
    extra = ["--provider", "cuda"]
    if args.rehearse:
        steps_arg, extra = "correctness,layers,model,graphs,triton", ["--rehearse",
                                                                     "--min-seconds", "0.05"]
        bench_budget = min(bench_budget, 60)
    if bench_budget > 20:
        rc, _ = run_logged([args.python, "-P", str(ROOT / "benchmarks" / "gpu_bench.py"),
                            "--out", str(out), "--models", str(models), "--steps", steps_arg,
                            "--budget", f"{bench_budget:.0f}", *extra],
                           env, out / "bench.log", bench_budget + 60)
        step("gpu_bench", "ok" if rc == 0 else f"rc {rc}", t,
             f"path {'onnxruntime CUDA EP' if cuda else 'Triton + torch (no CUDA EP)'}")
    else:
        step("gpu_bench", "skipped", t, "no time left")
    device = "unknown device"
    bench_json = out / "gpu_bench.json"
    body = ""
    if bench_json.is_file():
        device = json.loads(bench_json.read_text())["device"]
        body = (out / "gpu_bench.md").read_text()
    (out / "RESULTS-gpu.md").write_text(results_header(steps, device) + body)
    log(f"wrote {out / 'RESULTS-gpu.md'} ({time.perf_counter() - t0:.0f} s in all)")
    expected = ("ok", "passed") + (("no CUDA provider",) if args.rehearse else ())
    return 0 if all(x["status"] in expected for x in steps) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prep", help="CPU machine: wheel parts, package, models, call plan")
    pp.add_argument("--part-mib", type=int, default=PART_SIZE // 2**20)
    pp.add_argument("--smollm2-config", default=str(ROOT / ".cache/smollm2-135m/hf/config.json"))
    pp.add_argument("--skip-models", action="store_true")
    pk = sub.add_parser("part", help="GPU machine: store part K")
    pk.add_argument("k", type=int)
    pr = sub.add_parser("run", help="GPU machine: install, gpu tests, benchmark")
    pr.add_argument("--budget", type=float, default=RUN_BUDGET)
    pr.add_argument("--out", default=None, help="default $OUT")
    pr.add_argument("--python", default=sys.executable)
    pr.add_argument("--install-python", default=None, help="default: --python")
    pr.add_argument("--rehearse", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("dry-run", help="CPU machine: rehearse every step")
    sub.add_parser("calls", help="print the device calls")
    args = p.parse_args(argv)
    if args.cmd == "prep":
        import gpu_prep

        gpu_prep.prep(args)
        return 0
    if args.cmd == "part":
        return part(args.k)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "calls":
        print_calls(plan_calls(_manifest(), tree_size()))
        return 0
    import gpu_dry_run

    return gpu_dry_run.dry_run(args)


if __name__ == "__main__":
    sys.exit(main())
