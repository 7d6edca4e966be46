"""The instruction sets of the CPU kernels, read from the built op library's machine code.

Each kernel family carries its own target attribute; a compiler or flag change that let AVX-512
instructions into the AVX2 or AVX-VNNI kernels would crash on CPUs without AVX-512, and no
test on an AVX-512 machine would notice by running them.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import serq_onnx

OBJDUMP = shutil.which("objdump")
pytestmark = pytest.mark.skipif(OBJDUMP is None, reason="objdump (binutils) is not installed")
# Registers only EVEX (AVX-512) encodings can name.
_EVEX_ONLY = re.compile(r"%zmm\d+|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b|\{1to\d+\}")


@pytest.fixture(scope="module")
def functions() -> dict[str, list[str]]:
    """Demangled function name -> its instructions, for the kernel namespaces."""
    out = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", "-C",
                          serq_onnx.get_library_path()], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = m.group(1) if "(anonymous namespace)::" in m.group(1) else None
            if current:
                funcs[current] = []
        elif current and "\t" in line:
            funcs[current].append(line.split("\t", 1)[1])
    return funcs


def _family(functions, ns: str) -> list[str]:
    code = [i for name, body in functions.items() if f"::{ns}::" in name for i in body]
    assert code, f"no {ns} kernel functions found in the library"
    return code


def test_avx2_kernels_use_no_avx512_or_vnni(functions):
    code = _family(functions, "avx2")
    assert not [i for i in code if _EVEX_ONLY.search(i) or "vpdpbusd" in i][:5]
    assert any("vpmaddubsw" in i for i in code)


def test_avxvnni_kernels_use_the_vex_encoding_only(functions):
    code = _family(functions, "avxvnni")
    assert not [i for i in code if _EVEX_ONLY.search(i)][:5]
    dp = [i for i in code if "vpdpbusd" in i]
    assert dp and all(i.startswith("{vex}") for i in dp), dp[:3]


def test_avx512_kernels_use_full_width_vnni(functions):
    code = _family(functions, "avx512")
    assert any(re.search(r"vpdpbusd .*%zmm", i) for i in code)
