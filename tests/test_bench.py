"""`serq-onnx bench` times real kernels: its SerqMatMul models compute what the reference does,
and every kernel it lists ran."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import serq_onnx
from serq_onnx import bench, reference


@pytest.mark.parametrize("bits_a,group_a", [(8, 128), (4, 32)])
def test_bench_serq_model_matches_reference(bits_a, group_a):
    rng = np.random.default_rng(3)
    K, N, M = 192, 80, 5
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = bench.serq_matmul(w, bits_a=bits_a, rank=32, group=64, group_a=group_a)
    proto = onnx.load_from_string(model)
    node = proto.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group_a"] == group_a and attrs["bits_a"] == bits_a
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    a = rng.standard_normal((M, K)).astype(np.float32)
    got = serq_onnx.session(model).run(None, {"A": a})[0]
    want = reference.serq_matmul(a, inits["B"], inits["scales"], inits["wsum"],
                                 act_perm=inits["act_perm"], **{k: attrs[k] for k in (
                                     "K", "N", "rank", "group_w", "group_a", "bits_a", "bits_w")})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bench_run_times_every_kernel_at_scheme_defaults():
    results = bench.run([(128, 64)], [1, 4], min_seconds=0.01, progress=False)
    assert [(r.K, r.N, r.M) for r in results] == [(128, 64, 1), (128, 64, 4)]
    for r in results:
        assert set(r.ms) == {"float MatMul", "MatMulNBits", "MatMulNBits int8",
                             "SerqMatMul w4a8", "SerqMatMul w4a4"}
        assert all(v > 0 for v in r.ms.values())
    table = bench.format_table(results)
    assert "fp32/w4a8" in table and "128x64" in table
