"""``convert``/``nbits`` never destroy an input, write nothing on failure, and clean up on
SIGINT/SIGTERM; output folders get ordinary permissions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from serq_onnx import SerqError
from serq_onnx.output_dir import check_output

FAST = ["-q", "--rank", "16", "--group-w", "32", "--group-a", "32", "--calib-samples", "2",
        "--calib-seqlen", "32", "--weight-quant", "rtn"]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serq_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir(), **kw)


@pytest.fixture
def user_tree(tiny_llama, tmp_path):
    """A user's folder: ``work/models/tiny/`` (a copy of the export) beside ``work/notes.txt``."""
    work = tmp_path / "work"
    model_dir = work / "models" / "tiny"
    shutil.copytree(tiny_llama.onnx_path.parent, model_dir)
    (work / "notes.txt").write_text("mine")
    return work, model_dir / "model.onnx"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["parent", "grandparent", "model folder", "model file",
                                   "symlink to parent"])
def test_output_holding_the_input_is_refused(user_tree, where):
    work, model = user_tree
    before = _snapshot(work)
    out = {"parent": model.parent.parent, "grandparent": work, "model folder": model.parent,
           "model file": model, "symlink to parent": work / "link"}[where]
    if where == "symlink to parent":
        out.symlink_to(model.parent.parent, target_is_directory=True)
        before = _snapshot(work)
    proc = _cli("convert", model, "-o", out, "--overwrite", *FAST)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("serq-onnx: error:") and "\n" not in line, proc.stderr
    assert "input" in line
    assert _snapshot(work) == before  # nothing deleted, nothing added
    assert model.is_file()


def test_calibration_text_inside_the_output_is_refused(user_tree, tmp_path):
    work, model = user_tree
    out = tmp_path / "out"
    out.mkdir()
    (out / "serq_config.json").write_text("{}")  # a previous output, so --overwrite applies
    text = out / "calib.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 50)
    proc = _cli("convert", model, "-o", out, "--overwrite", "--calib", text, *FAST)
    assert proc.returncode == 2 and "calib.txt" in proc.stderr, proc.stderr
    assert text.is_file()


def test_overwrite_replaces_only_a_folder_serq_onnx_wrote(user_tree, tmp_path):
    work, model = user_tree
    out = tmp_path / "stuff"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    proc = _cli("convert", model, "-o", out, "--overwrite", *FAST)
    assert proc.returncode == 2 and "not written by serq-onnx" in proc.stderr, proc.stderr
    assert (out / "thesis.tex").read_text() == "mine"


def test_overwrite_replaces_a_previous_output(user_tree, tmp_path):
    work, model = user_tree
    out = tmp_path / "out"
    assert _cli("convert", model, "-o", out, *FAST).returncode == 0
    (out / "stale.txt").write_text("old")
    proc = _cli("convert", model, "-o", out, "--overwrite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_inside_the_model_folder_is_allowed_and_leaves_the_input(user_tree):
    work, model = user_tree
    before = _snapshot(model.parent)
    out = model.parent / "serq"
    proc = _cli("convert", model, "-o", out, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in _snapshot(model.parent).items() if not k.startswith("serq/")} == before
    # and again with --overwrite: the earlier output is not copied into the new one
    assert _cli("convert", model, "-o", out, "--overwrite", *FAST).returncode == 0
    assert not (out / "serq").exists()


def test_output_folder_permissions_follow_the_umask(user_tree, tmp_path):
    work, model = user_tree
    out = tmp_path / "out"
    proc = _cli("convert", model, "-o", out, *FAST)
    assert proc.returncode == 0, proc.stderr
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~mask)


def test_nbits_refuses_an_output_holding_its_input(user_tree):
    work, model = user_tree
    before = _snapshot(work)
    proc = _cli("nbits", model, "-o", work, "--overwrite", "-q")
    assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert _snapshot(work) == before


def test_check_output_resolves_symlinks(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SerqError, match="contains the input"):
        check_output(tmp_path / "alias", [model_dir / "model.onnx"], overwrite=True)
    assert check_output(tmp_path / "new", [model_dir / "model.onnx"], overwrite=False) == \
        (tmp_path / "new").resolve()


def _convert_and_signal(model: Path, out: Path, sig: int) -> tuple[int, str]:
    """Start a conversion into ``out`` and send ``sig`` as soon as its staging folder appears."""
    proc = subprocess.Popen([sys.executable, "-m", "serq_onnx.cli", "convert", str(model), "-o",
                             str(out), *FAST], cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir()):
                proc.send_signal(sig)
                break
            time.sleep(0.002)
        else:
            pytest.fail(f"the staging folder never appeared: {proc.communicate()[1]}")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_save_leaves_nothing(user_tree, tmp_path, sig, code):
    """The signal is sent as soon as the staging folder appears (the save and verify steps).
    On a loaded machine the conversion may finish before the signal lands (exit 0, the output
    complete): that try proves nothing, and another is made."""
    work, model = user_tree
    out = tmp_path / "out"
    for _ in range(3):
        rc, err = _convert_and_signal(model, out, sig)
        if rc != 0:
            break
        assert (out / "model.onnx").is_file() and (out / "serq_config.json").is_file(), err
        shutil.rmtree(out)
    else:
        pytest.fail("three conversions finished before the signal landed")
    assert rc == code, err
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_a_signal_during_the_swap_waits_for_it(tmp_path, monkeypatch):
    """Sent while another thread runs (as onnxruntime's and tqdm's do), SIGINT still waits
    until the new output is in place and the old one gone, then interrupts."""
    from serq_onnx import output_dir

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    new, out = tmp_path / ".out.tmp-x", tmp_path / "out"
    new.mkdir()
    out.mkdir()
    (out / "old.txt").write_text("old")
    (new / "new.txt").write_text("new")
    real_rename, seen = Path.rename, []

    def rename(self, target):
        if not seen:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # time for the signal to land, in whichever thread
        seen.append(self.name)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    try:
        with pytest.raises(KeyboardInterrupt):
            output_dir.commit(new, out)
            pytest.fail("the held SIGINT was not delivered after the swap")
    finally:
        stop.set()
        worker.join()
    assert seen == ["out", ".out.tmp-x"]  # both renames ran
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "new.txt").read_text() == "new"
