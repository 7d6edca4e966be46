"""Which instruction sets the CPU kernel can use here, and which one a session's kernel chose.

The kernel picks its micro-kernel when a session creates it, capped by ``$SERQ_ONNX_ISA``; with
``$SERQ_ONNX_VERBOSE`` it prints the choice to stderr, which :func:`session_with_isa` reads back,
so a test knows which code really ran rather than which one it asked for.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

ORDER = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx")
# CPU flags (/proc/cpuinfo spelling) the kernel's run-time detection requires (int_gemm_x86.cc).
_FLAGS = {"avx2": {"avx2", "fma"},
          "avxvnni": {"avx2", "fma", "avx_vnni"},
          "avx512vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
          "amx": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"}}
_CHOICE = re.compile(r"SerqMatMul: K=\d+ N=\d+ rank=\d+ block=\d+ bits_w=\d+ bits_a=\d+: (\w+) kernel")


def required_flags(isa: str) -> set[str]:
    """The /proc/cpuinfo flags the kernel's detection of ``isa`` requires."""
    return _FLAGS.get(isa, set())


def cpu_flags() -> set[str]:
    """This CPU's /proc/cpuinfo flags (none off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def cpu_isas() -> list[str]:
    """Instruction sets this CPU supports, lowest first (scalar only off x86 Linux)."""
    flags = cpu_flags()
    return ["scalar"] + [isa for isa in ORDER[1:] if _FLAGS[isa] <= flags]


def expected_kernel(cap: str, bits_w: int, block: int) -> str:
    """The kernel the dispatch (X86GemmKernel) picks for a block shape, at most ``cap``: the
    SIMD kernels read whole panel rows (8 codes with 4-bit weights, 4 with 8-bit), else scalar;
    AMX takes blocks of one tile step (<= 64 codes) or whole steps of 64, up to 512 codes."""
    if cap == "scalar" or block % (8 if bits_w == 4 else 4):
        return "scalar"
    if cap == "amx" and not (block <= 64 or (block % 64 == 0 and block <= 512)):
        return "avx512vnni"
    return cap


@contextlib.contextmanager
def _stderr_to(buf: list):
    """Collects what native code writes to file descriptor 2."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            buf.append(f.read().decode(errors="replace"))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def session_with_isa(make_session, cap: str):
    """``(session, kernel isa)``: ``make_session()`` run with the kernel capped at ``cap``; the
    isa is what the (single) SerqMatMul kernel reported choosing."""
    buf: list[str] = []
    with _env(SERQ_ONNX_ISA=cap, SERQ_ONNX_VERBOSE="1"), _stderr_to(buf):
        sess = make_session()
    found = _CHOICE.findall(buf[0])
    if len(found) != 1:
        raise AssertionError(f"expected one kernel-choice line on stderr, got: {buf[0]!r}")
    return sess, found[0]
