"""``gpu_check.py prep`` on the CPU machine: everything the GPU calls carry, into ``.gpu/``.

The onnxruntime-gpu wheel (recompressed, split into checked parts), the installed package, the
AOT cubins the op library embeds, the benchmark's models packed, and the plan of calls, checked
against the transfer limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gpu_parts
from gpu_check import (BUNDLE, LIMIT, MARGIN, ORT_GPU, PARTS, PLATFORMS, PREP, REHEARSAL_DEPS,
                       ROOT, find_python312, log, mib, path_size, plan_calls, print_calls,
                       tree_size)


def download(dest: Path, spec: str = ORT_GPU) -> Path:
    """The cp312 manylinux wheel of ``spec`` (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-{spec.split('==')[1]}-cp312-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd + [spec], check=True)
        found = sorted(dest.glob(f"{name}-*-cp312-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"expected one {spec} wheel in {dest}, found {found}")
    return found[0]


def download_rehearsal_deps(dest: Path) -> None:
    """cp312 wheels of onnxruntime's own needs, for the dry run's Python 3.12 only."""
    if len(list(dest.glob("*.whl"))) >= len(REHEARSAL_DEPS):
        return
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + REHEARSAL_DEPS, check=True)


def copy_package(dest: Path) -> Path:
    """The installed ``serq_onnx`` (with ``passes``, ``kernels`` and ``lib/``), without byte
    code: plain Python and a C++ library that does not link libpython, so Python 3.12 loads it."""
    import serq_onnx

    src = Path(serq_onnx.__file__).resolve().parent
    lib = src / "lib" / "libserq_onnx_ops.so"
    if not lib.is_file() or b"CUDAExecutionProvider" not in lib.read_bytes():
        raise SystemExit(f"{lib} is missing or built without its CUDA part; run `make setup`")
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    if "libpython" in needed:
        raise SystemExit(f"{lib} links libpython; it would be tied to one Python version")
    out = dest / "serq_onnx"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tied = [p for p in out.rglob("*") if "cpython-3" in p.name]
    if tied:
        raise SystemExit(f"files tied to one Python version in the package: {tied}")
    return out


def copy_aot(pkg: Path, dest: Path, arch: int = 90) -> Path | None:
    """The AOT build the op library embeds (its ``aot_key``), sm_90 cubins only, for
    ``tests/test_kernels_gpu.py`` (``SERQ_KERNELS_AOT_DIR``): the GPU tests then launch the very
    binaries shipped, not ones the GPU machine's older Triton would compile. Each cubin is
    checked against the library's own list of sha256s."""
    import hashlib

    embedded = json.loads((pkg / "lib" / "serq_cuda_cubins.json").read_text())
    cache = Path(os.environ.get("SERQ_AOT_CACHE_DIR", ROOT / ".cache" / "aot"))
    src = cache / embedded["aot_key"]
    if not (src / "manifest.json").is_file():
        log(f"SKIPPED: AOT build {src} not found; the GPU tests will build their own cubins")
        return None
    out = dest / "aot"
    shutil.rmtree(out, ignore_errors=True)
    (out / f"sm_{arch}").mkdir(parents=True)
    shutil.copy2(src / "manifest.json", out / "manifest.json")
    want = {c["name"]: c["sha256"] for c in embedded["cubins"] if c["arch"] == arch}
    for e in json.loads((src / "manifest.json").read_text())["kernels"]:
        if e["arch"] != arch:
            continue
        data = (src / e["cubin"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != want.get(e["name"]):
            raise SystemExit(f"{src / e['cubin']} is not the cubin the library embeds")
        (out / e["cubin"]).write_bytes(data)
    return out


def pack_models(models: Path, dest: Path) -> Path:
    """``models`` as one xz tar (repeated weights shrink to almost nothing)."""
    out = dest / "models.tar.xz"
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for d in sorted(models.iterdir()):
            if not d.name.startswith("_"):
                tar.add(d, arcname=d.name)
    return out



def prep(args) -> None:
    t0 = time.perf_counter()
    original = download(PREP / "dl")
    log(f"wheel {original.name}: {mib(original.stat().st_size)} "
        f"({time.perf_counter() - t0:.0f} s)")
    wheel = PREP / "wheel" / original.name
    stamp = PREP / "wheel" / "source.sha256"
    source_sha = gpu_parts.sha256_file(original)
    if not wheel.is_file() or not stamp.is_file() or stamp.read_text().strip() != source_sha:
        t = time.perf_counter()
        gpu_parts.repack_lzma(original, wheel)
        stamp.write_text(source_sha + "\n")
        log(f"recompressed with LZMA: {mib(wheel.stat().st_size)} "
            f"({time.perf_counter() - t:.0f} s; same members, compared)")
    manifest = gpu_parts.split(wheel, PARTS, args.part_mib * 2**20)
    manifest["source_sha256"] = source_sha
    (PARTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"split into {len(manifest['parts'])} parts of at most {args.part_mib} MiB")
    BUNDLE.mkdir(parents=True, exist_ok=True)
    pkg = copy_package(BUNDLE / "pkg")
    log(f"package {pkg}: {mib(path_size(pkg))}")
    aot = copy_aot(pkg, BUNDLE)
    if aot:
        log(f"AOT cubins (sm_90, as embedded): {mib(path_size(aot))}")
    py312 = find_python312()
    if py312:  # the dry run imports the wheel under Python 3.12, which needs these beside it
        download_rehearsal_deps(PREP / "dl-rehearse")
    if not args.skip_models:
        import gpu_models

        config = Path(args.smollm2_config)
        if not config.is_file():
            from serq_onnx.data import smollm2_hf_dir

            config = smollm2_hf_dir() / "config.json"
        t = time.perf_counter()
        gpu_models.build(PREP / "models", config, log=log)
        packed = pack_models(PREP / "models", BUNDLE)
        log(f"models packed: {mib(packed.stat().st_size)} ({time.perf_counter() - t:.0f} s)")
    calls = plan_calls(manifest, tree_size())
    (PREP / "calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    print_calls(calls)
    over = [c for c in calls if c["bytes"] > LIMIT - MARGIN]
    if over:
        raise SystemExit(f"calls over {mib(LIMIT - MARGIN)}: {[c['call'] for c in over]}; "
                         "lower --part-mib or shrink the bundle")
    log(f"prep done in {time.perf_counter() - t0:.0f} s")
