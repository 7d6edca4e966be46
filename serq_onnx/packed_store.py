"""The op's packed weight inputs written to disk as each layer is quantized.

Without it a conversion holds every layer's packed weights (a fifth of the float model) until
the output is saved at the end; with it, each layer's are written to one scratch file once
packed and read back mapped, so a model converts with one layer's quantized weights in memory
at a time and the save copies them from the scratch file into the output's external data.
Arrays that :meth:`PackedStore.put` returns are read-only maps of that file (their pages are
the kernel's to reclaim); :meth:`PackedStore.tensor` hands them to the graph as
``ir.ExternalTensor`` so that the save reads them tensor by tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import SerqError

ALIGN = 64  # every array starts on a cache line (and on its dtype's alignment)


class PackedStore:
    """One scratch file in a temporary folder (``TMPDIR``); :meth:`close` removes it, as do
    garbage collection and interpreter exit, whichever comes first."""

    FILE = "packed.bin"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="serq-packed-"))
        self.path = self.folder / self.FILE
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self._remove = weakref.finalize(self, _remove, self._fd, str(self.folder))
        self._end = 0
        self._placed: dict[int, tuple[np.memmap, int]] = {}  # id(map) -> (map, offset)

    @property
    def closed(self) -> bool:
        return not self._remove.alive

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self._end

    def put(self, array: np.ndarray) -> np.ndarray:
        """``array`` written to the scratch file, as a read-only map of what was written;
        an empty array comes back as it is."""
        if self.closed:
            raise SerqError("the packed weights' scratch folder was already removed")
        array = np.ascontiguousarray(array)
        if array.nbytes == 0:
            return array
        offset = -(-self._end // ALIGN) * ALIGN
        try:
            view = memoryview(array).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as err:
            raise SerqError(f"cannot write the packed weights to {self.folder} "
                            f"({err.strerror or err}): free disk space there or point TMPDIR "
                            "at a larger disk") from None
        self._end = offset + array.nbytes
        mapped = np.memmap(self.path, dtype=array.dtype, mode="r", offset=offset,
                           shape=array.shape)
        self._placed[id(mapped)] = (mapped, offset)
        return mapped

    def tensor(self, array: np.ndarray, name: str) -> ir.TensorProtocol:
        """The initializer for ``array``: a reference into the scratch file where ``put``
        made it, else the array itself."""
        placed = self._placed.get(id(array))
        if placed is None or placed[0] is not array:
            return ir.tensor(array, name=name)
        return ir.ExternalTensor(self.FILE, placed[1], array.nbytes,
                                 ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape),
                                 name=name, base_dir=self.folder)

    def close(self) -> None:
        """Remove the scratch file (idempotent); every tensor it holds must be saved first."""
        self._placed.clear()
        self._remove()


def _remove(fd: int, folder: str) -> None:
    os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)


def tensor(store: PackedStore | None, array: np.ndarray, name: str) -> ir.TensorProtocol:
    """:meth:`PackedStore.tensor`, or the array itself without a store."""
    return ir.tensor(array, name=name) if store is None else store.tensor(array, name)


def put(store: PackedStore | None, array: np.ndarray) -> np.ndarray:
    """:meth:`PackedStore.put`, or the array itself without a store."""
    return array if store is None else store.put(array)
