"""Packed weights written to disk as each layer is quantized: the scratch file's contents, its
errors and removal, and a conversion of an external-data model holding none of its packed
layers in memory."""

from __future__ import annotations

import errno
import gc
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from serq_onnx import SerqError, converter, packed_store
from serq_onnx.packed_store import PackedStore


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """``TMPDIR`` for this test alone, to see what the store leaves there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_put_maps_what_was_written_and_the_graph_reads_it_from_the_file(tmpdir_here):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (7, 13), dtype=np.uint8),
              rng.standard_normal((5, 3)).astype(np.float32),
              rng.integers(-100, 100, (4, 9), dtype=np.int32)]
    store = PackedStore()
    placed = [store.put(a) for a in arrays]
    for a, m in zip(arrays, placed):
        assert isinstance(m, np.memmap) and not m.flags.writeable
        np.testing.assert_array_equal(m, a)
        t = store.tensor(m, "w")
        assert isinstance(t, ir.ExternalTensor)
        assert t.offset % packed_store.ALIGN == 0
        np.testing.assert_array_equal(t.numpy(), a)
        assert t.dtype == ir.DataType.from_numpy(a.dtype) and tuple(t.shape) == a.shape
        t.release()
    assert store.nbytes >= sum(a.nbytes for a in arrays)
    # Arrays the store did not write (a view of one it did included) stay in memory.
    for other in (arrays[0], placed[0][1:]):
        t = store.tensor(other, "v")
        assert not isinstance(t, ir.ExternalTensor)
        np.testing.assert_array_equal(t.numpy(), other)
    empty = np.zeros((0, 4), np.float32)
    assert store.put(empty) is empty
    store.close()
    assert list(tmpdir_here.iterdir()) == []
    store.close()  # idempotent
    with pytest.raises(SerqError, match="already removed"):
        store.put(arrays[0])


def test_without_a_store_arrays_stay_in_memory():
    a = np.arange(6, dtype=np.int32)
    assert packed_store.put(None, a) is a
    t = packed_store.tensor(None, a, "a")
    assert not isinstance(t, ir.ExternalTensor)
    np.testing.assert_array_equal(t.numpy(), a)


def test_a_store_dropped_unclosed_removes_its_folder(tmpdir_here):
    store = PackedStore()
    store.put(np.ones(10, np.float32))
    folder = store.folder
    del store
    gc.collect()
    assert not folder.exists()


def test_a_full_disk_is_a_clear_error(tmpdir_here, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = PackedStore()
    monkeypatch.setattr(packed_store.os, "pwrite", full)
    with pytest.raises(SerqError, match="cannot write the packed weights.*No space left.*TMPDIR"):
        store.put(np.ones(10, np.float32))
    store.close()


@pytest.mark.parametrize("weight_quant", ["gptq", "rtn"])
def test_external_data_conversion_keeps_no_packed_layer_in_memory(
        tiny_llama_external, tmp_path, tmpdir_here, monkeypatch, weight_quant):
    """Each layer's packed weights are in the scratch file as soon as they are made, the fused
    siblings' too, and the scratch folder is gone afterwards; the output is the single-file
    model's conversion (tests/test_scale.py compares them bit for bit)."""
    from serq_onnx.passes import fuse_siblings, gptq, quantize

    seen: list[tuple[str, bool]] = []
    real_pack = quantize.pack_target

    def pack_target(t, cfg, codes, scales, store=None):
        real_pack(t, cfg, codes, scales, store)
        w = t.weights
        seen.append((t.name, store is not None and all(
            isinstance(a, np.memmap) and Path(a.filename).parent == store.folder
            for a in (w.B, w.scales, w.wsum))))

    monkeypatch.setattr(quantize, "pack_target", pack_target)
    monkeypatch.setattr(gptq, "pack_target", pack_target)
    fused: list[bool] = []
    real_fuse = fuse_siblings.FuseSiblingsPass._fuse

    def fuse(graph, group, nodes, store=None):
        real_fuse(graph, group, nodes, store)
        node = group.targets[0].node
        fused.append(all(isinstance(node.inputs[i].const_value, ir.ExternalTensor)
                         for i in (1, 2, 3)))

    monkeypatch.setattr(fuse_siblings.FuseSiblingsPass, "_fuse", staticmethod(fuse))
    ids = [np.arange(2, 66) % 300]
    report = converter.convert(tiny_llama_external, tmp_path / "o", calib_ids=ids, weight_quant=weight_quant,
                               progress=False, log=lambda *_: None)
    assert seen and all(ok for _, ok in seen), seen
    assert fused and all(fused)
    assert report.layers_converted == len(seen)
    assert list(tmpdir_here.iterdir()) == []
    out = ir.load(tmp_path / "o" / "model.onnx")
    serq = [n for n in out.graph if n.op_type == "SerqMatMul"]
    assert serq and all(Path(n.inputs[1].const_value.path).name == "model.onnx.data"
                        for n in serq)
    assert json.loads((tmp_path / "o" / "serq_config.json").read_text())["serq_nodes"] == \
        len(serq)


def test_single_file_models_keep_packed_layers_in_memory(tiny_llama, tmp_path, tmpdir_here,
                                                         monkeypatch):
    """Without external data the output is one file, so there is nothing to write ahead."""
    from serq_onnx.passes import gptq

    stores = []
    real_pack = gptq.pack_target
    monkeypatch.setattr(gptq, "pack_target",
                        lambda t, cfg, c, s, store=None: (stores.append(store),
                                                          real_pack(t, cfg, c, s, store)))
    converter.convert(tiny_llama.onnx_path, tmp_path / "o", calib_ids=[np.arange(2, 66) % 300],
                      verify=False, progress=False, log=lambda *_: None)
    assert stores and all(s is None for s in stores)
    assert not (tmp_path / "o" / "model.onnx.data").exists()


def test_a_failed_conversion_removes_the_scratch_folder(tiny_llama_external, tmp_path,
                                                        tmpdir_here, monkeypatch):
    from serq_onnx import output_dir

    def fail(*args, **kwargs):
        raise SerqError("no room for the output")

    monkeypatch.setattr(output_dir, "stage", fail)
    with pytest.raises(SerqError, match="no room"):
        converter.convert(tiny_llama_external, tmp_path / "o", calib_ids=[np.arange(2, 66) % 300],
                          verify=False, progress=False, log=lambda *_: None)
    assert list(tmpdir_here.iterdir()) == []
    assert not (tmp_path / "o").exists()
