"""The AOT cubin build (``kernels/aot.py``) behind a cache keyed by its inputs.

``python scripts/aot_cached.py --root SRC --cache DIR --out OUT`` leaves the manifest and
cubins of every kernel variant in ``OUT`` (``OUT/manifest.json``, ``OUT/sm_*/``). The build
runs only when ``DIR/<key>`` does not hold it yet; the key hashes the sources under
``kernels/``, ``serq_onnx/reference.py``, this script, the triton version and the archs, so any
change of the kernels rebuilds. A failed build leaves nothing in the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def cache_key(root: Path, archs: str) -> str:
    import triton

    h = hashlib.sha256()
    files = sorted((root / "kernels").rglob("*.py")) + [root / "serq_onnx" / "reference.py",
                                                        Path(__file__).resolve()]
    for f in files:
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    h.update(f"triton {triton.__version__} archs {archs}".encode())
    return h.hexdigest()[:24]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="source tree holding kernels/")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="80,89,90")
    a = ap.parse_args(argv)
    root = a.root.resolve()
    try:
        key = cache_key(root, a.arch)
    except ImportError as e:
        print(f"aot_cached: the AOT build needs triton in this Python ({sys.executable}): {e}",
              file=sys.stderr)
        return 1
    entry = a.cache / "aot" / key
    if (entry / "manifest.json").is_file():
        print(f"aot_cached: cubins from the cache {entry}")
    else:
        tmp = a.cache / "aot" / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "kernels.aot", "--out", str(tmp),
                              "--arch", a.arch], cwd=root, env=env, stdout=subprocess.DEVNULL)
        if rc != 0 or not (tmp / "manifest.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"aot_cached: the AOT build (python -m kernels.aot) failed with status {rc}",
                  file=sys.stderr)
            return 1
        try:
            tmp.rename(entry)
        except OSError:  # a concurrent build got there first
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"aot_cached: built the cubins in {time.perf_counter() - t0:.0f}s, cached in {entry}")
    shutil.rmtree(a.out, ignore_errors=True)
    shutil.copytree(entry, a.out)
    (a.out / "key").write_text(key + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
