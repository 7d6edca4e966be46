"""How the build finds onnxruntime's C/C++ API headers (custom_ops/cmake/OrtHeaders.cmake).

``pip install .`` must work on a machine that reaches only the package registries, or fail at
once with the one command that fixes it. These tests run CMake's configure step only (seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SERQ_CACHE") or ROOT / ".cache")


def _cmake() -> str:
    cmake = shutil.which("cmake") or str(Path(sys.executable).with_name("cmake"))
    if not Path(cmake).exists():
        pytest.skip("cmake not found")
    return cmake


def _configure(tmp_path: Path, *defines: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "ORT_INCLUDE_DIR"}
    clean.update(env)
    r = subprocess.run([_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "b"), *defines],
                       capture_output=True, text=True, timeout=600, env=clean)
    # CMake wraps long messages: compare with whitespace runs collapsed.
    r.stdout, r.stderr = " ".join(r.stdout.split()), " ".join(r.stderr.split())
    return r


@pytest.fixture
def no_system_headers() -> None:
    if Path("/usr/include/onnxruntime/onnxruntime_cxx_api.h").is_file():
        pytest.skip("this machine has /usr/include/onnxruntime, which the build takes first")


def test_no_headers_anywhere_fails_at_once_naming_the_fix(tmp_path, no_system_headers):
    t = time.monotonic()
    r = _configure(tmp_path, "-DSERQ_ORT_FETCH_DEBIAN=OFF", "-DSERQ_ORT_DOWNLOAD=OFF",
                   env={"HOME": str(tmp_path / "home")})
    assert r.returncode != 0
    assert "onnxruntime C/C++ API headers (onnxruntime_cxx_api.h) were not found" in r.stderr
    assert "ORT_INCLUDE_DIR=<that folder>/include pip install ." in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 60


def test_unreachable_release_archive_fails_with_the_same_message(tmp_path, no_system_headers):
    """A download that cannot succeed (here a missing file:// archive) is reported and ends in
    the same instructions, not in a half-configured build."""
    r = _configure(tmp_path, "-DSERQ_ORT_FETCH_DEBIAN=OFF",
                   f"-DSERQ_ORT_ARCHIVE_URL=file://{tmp_path}/missing.tgz",
                   env={"HOME": str(tmp_path / "home")})
    assert r.returncode != 0
    assert "failed" in r.stdout and "missing.tgz" in r.stdout, r.stdout[-2000:]
    assert "ORT_INCLUDE_DIR=<that folder>/include pip install ." in r.stderr
    assert not (tmp_path / "b" / "build.ninja").exists() and not (tmp_path / "b" / "Makefile").exists()


def test_plain_configure_takes_debian_headers_through_the_fetch_script(tmp_path, no_system_headers):
    """With no ORT_INCLUDE_DIR the build runs scripts/fetch_ort_headers.sh itself. Pointed at the
    cache that ``make`` filled, the script finds its earlier download, so no network is used."""
    headers = CACHE / "ort-headers"
    if not (headers / "x/usr/include/onnxruntime/onnxruntime_cxx_api.h").is_file():
        pytest.skip(f"{headers} holds no fetched headers (make setup fills it)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("apt-get / dpkg-deb not on this machine")
    r = _configure(tmp_path, "-DSERQ_ORT_DOWNLOAD=OFF",
                   env={"SERQ_ORT_HEADERS_CACHE": str(headers), "HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from Debian 13's libonnxruntime-dev (scripts/fetch_ort_headers.sh)" in r.stdout
    assert str(headers) in r.stdout
