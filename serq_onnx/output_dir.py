"""Output folders written atomically, and never at the cost of the inputs.

A converted model is staged in a hidden folder beside the output and moved into place only when
everything succeeded. ``--overwrite`` then replaces the old output, so the output must not hold
anything the run reads: refusing an output that equals, contains or is an input (after resolving
symlinks) is what keeps ``--overwrite`` from deleting a user's model or text.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx_ir as ir

from .errors import SerqError
from .modelio import save_model

# Files that mark a folder as one this tool wrote, so that --overwrite may replace it.
MARKERS = ("serq_config.json", "nbits_config.json")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                 overwrite: bool) -> Path:
    """The resolved output folder, after refusing every output that could destroy an input.

    ``inputs``: the files the run reads (the model, its data, the calibration text); the model's
    folder is an input too, since its side files are copied. Raises :class:`SerqError`.
    """
    out = Path(out_dir).expanduser().resolve()
    for raw in inputs:
        p = Path(raw).expanduser().resolve()
        folder = p if p.is_dir() else p.parent
        if out == p:
            raise SerqError(f"the output folder {out_dir} is the input {raw}; choose a new folder")
        if _within(folder, out):
            what = "is the folder of" if out == folder else "contains"
            raise SerqError(f"the output folder {out_dir} {what} the input {raw}; "
                            "--overwrite would delete it, so choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise SerqError(f"the output {out_dir} exists and is not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SerqError(f"output folder {out_dir} exists and is not empty; choose another "
                            "or pass --overwrite")
        if not any((out / m).is_file() for m in MARKERS):
            raise SerqError(f"output folder {out_dir} was not written by serq-onnx (it has no "
                            f"{' or '.join(MARKERS)}), so --overwrite will not replace it; "
                            "choose an empty or new folder")
    if not out.parent.is_dir():
        raise SerqError(f"the parent folder of {out_dir} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise SerqError(f"cannot write in {out.parent}; choose an output folder you can write")
    return out


def external_data_files(model: ir.Model) -> list[Path]:
    """The files holding a loaded model's external initializers."""
    files = set()
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            files.add(Path(t.path).resolve())
    return sorted(files)


def _model_files(model_path: Path) -> set[Path]:
    """The model file and its external data files (not copied as 'other files')."""
    files = {model_path}
    for p in model_path.parent.iterdir():
        if p.is_file() and (p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".onnx.data")
                            or p.name.startswith(model_path.name + "_data")):
            files.add(p)
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stage(model_path: Path, out_dir: Path, model: ir.Model) -> tuple[Path, Path]:
    """A hidden folder beside ``out_dir`` with ``model`` saved under the input's file name and
    every side file of the input folder (config, tokenizer); :func:`commit` moves it into place.
    The folder gets the permissions a plain ``mkdir`` would give (``mkdtemp`` makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        skip = _model_files(model_path)
        for p in model_path.parent.iterdir():
            if p.is_file() and p not in skip:
                shutil.copy2(p, tmp / p.name)
        out_model = tmp / model_path.name
        save_model(model, out_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, out_model


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the old output is swapped out and removed, so that no
    signal leaves the swap half done; a held signal is delivered afterwards. Handlers, not a
    signal mask: a mask covers only the calling thread, and onnxruntime's or tqdm's threads
    would take the signal and have it raised in the main thread all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers; signals are raised there anyway
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def commit(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; the old one is removed only once the new one is in."""
    with _signals_deferred():
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(model_path: Path, out_dir: Path, model: ir.Model) -> Iterator[tuple[Path, Path]]:
    """:func:`stage`, then :func:`commit` if the block succeeds; the staging folder is removed
    on any failure, interruption included."""
    tmp, out_model = stage(model_path, out_dir, model)
    try:
        yield tmp, out_model
        commit(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
