"""Inspect shipped cubins without a GPU: target arch, tensor-core instructions, registers, stack.

Uses ``cuobjdump`` (PyPI ``nvidia-cuda-cuobjdump``), which needs ``nvdisasm`` (PyPI
``nvidia-cuda-nvdisasm``) on PATH for ``-sass``; both are looked up in site-packages, then in
the Triton wheel's bundled copies, then on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sysconfig
from collections import Counter
from pathlib import Path

MMA_OPS = ("IMMA", "IGMMA", "HMMA", "HGMMA", "QMMA", "QGMMA")


def find_tool(name: str) -> Path | None:
    """``cuobjdump`` / ``nvdisasm`` from the NVIDIA PyPI packages, Triton's wheel, or PATH."""
    roots = [Path(p) for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    for sub in ("nvidia/cu13/bin", "nvidia/cuda_cuobjdump/bin", "nvidia/cuda_nvdisasm/bin",
                "nvidia/cu12/bin", "triton/backends/nvidia/bin"):
        for root in roots:
            p = root / sub / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
    found = shutil.which(name)
    return Path(found) if found else None


def _cuobjdump(flag: str, cubin: Path) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    env = dict(os.environ)
    disasm = find_tool("nvdisasm")
    if disasm is not None:
        env["PATH"] = f"{disasm.parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, env=env,
                       check=True)
    return r.stdout


def sass(cubin: Path) -> str:
    return _cuobjdump("-sass", cubin)


def sass_arch(text: str) -> str | None:
    """The ``sm_XX`` the SASS was generated for."""
    m = re.search(r"code for (sm_\w+)", text)
    return m.group(1) if m else None


def mma_instructions(text: str) -> Counter:
    """Counts of tensor-core opcodes (with their shape/type suffixes) in SASS text."""
    ops = "|".join(MMA_OPS)
    return Counter(re.findall(rf"\b((?:{ops})(?:\.[A-Za-z0-9]+)*)\b", text))


def res_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """Per function: ``REG``, ``STACK``, ``SHARED``, ``LOCAL`` from ``cuobjdump -res-usage``."""
    out: dict[str, dict[str, int]] = {}
    fn = None
    for line in _cuobjdump("-res-usage", cubin).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            out[fn] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return out
