"""The Triton kernels on a real GPU (torch CUDA tensors) against the reference, both through
Triton's JIT and as AOT cubins launched through the driver API.

Marked ``gpu`` and skipped, visibly, without a CUDA device. The kernels run in one child process
(without ``TRITON_INTERPRET``, which test_kernels_interp sets for this whole session); this
process builds the same cases from their seeds and checks the outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kernel_tolerance import MAX_SPLIT, check
from op_models import random_case

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# name: (K, N, rank, group_w, group_a, bits_w, bits_a, M, A dtype, forced split or 0)
CASES = {
    "w4a8_m1": (576, 72, 32, 128, 0, 4, 8, 1, "float16", 0),
    "w4a8_m7_odd": (201, 41, 36, 64, 128, 4, 8, 7, "float32", 0),
    "w4a4_m64": (200, 40, 36, 64, 32, 4, 4, 64, "float16", 0),
    "w4a8_m300_r0": (256, 33, 0, 128, 128, 4, 8, 300, "bfloat16", 0),
    "w4a4_gw32_m300": (96, 24, 20, 32, 32, 4, 4, 300, "float32", 0),
    "split3_m5": (576, 40, 64, 64, 64, 4, 8, 5, "float32", 3),
    "generic_gw16": (100, 20, 10, 16, 8, 4, 8, 7, "float32", 0),
    "generic_w8": (200, 40, 200, 64, 128, 8, 8, 7, "float16", 0),
    "llama_4096_m1": (4096, 4096, 128, 128, 128, 4, 8, 1, "float16", 0),
    "llama_4096_m256_a4": (4096, 1024, 128, 128, 32, 4, 4, 256, "float16", 0),
}

_CHILD = r"""
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from op_models import random_case
from serq_onnx.kernels import launch
from serq_onnx.kernels.cubin_launch import CubinRunner
cases, out, aot_dir = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
major, minor = torch.cuda.get_device_capability()
torch.zeros(1, device="cuda")  # the runtime's primary context, current on this thread
cubins = CubinRunner(aot_dir, 10 * major + minor)
for name, (K, N, r, gw, ga, bw, ba, M, dt, split) in cases.items():
    case = random_case(K, N, r, gw, ga, bw, ba, seed=len(name), act_scale=True,
                       act_perm=np.int64, bias=True)
    A = torch.from_numpy(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))
    A[min(1, M - 1), K // 3] = float("nan") if M > 1 else A[0, 0]
    A = A.to(getattr(torch, dt)).cuda()
    dw = launch.prepare_weights(case.B, case.scales, case.layout, case.bias, device="cuda")
    t = lambda x: torch.from_numpy(x).cuda()
    kw = dict(n_split=split) if split else {}
    y = launch.serq_matmul(A, dw, t(case.act_scale), t(case.act_perm), **kw)
    y2 = launch.serq_matmul(A, dw, t(case.act_scale), t(case.act_perm), **kw)
    yc = launch.serq_matmul(A, dw, t(case.act_scale), t(case.act_perm), runner=cubins, **kw)
    ydt, ycdt = str(y.dtype), str(yc.dtype)
    y, y2, yc = (v.float().cpu().numpy() for v in (y, y2, yc))
    np.savez(f"{out}/{name}.npz", A=A.float().cpu().numpy(), y=y, y_cubin=yc, dtype=ydt,
             dtype_cubin=ycdt, same=np.array_equal(y, y2, equal_nan=True))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Outputs of every case from Triton's JIT and from the AOT cubins (``SERQ_KERNELS_AOT_DIR``
    if set, else built here for this GPU's arch)."""
    out = tmp_path_factory.mktemp("gpu_kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    aot_dir = os.environ.get("SERQ_KERNELS_AOT_DIR")
    if not aot_dir:
        major, minor = torch.cuda.get_device_capability()
        aot_dir = str(tmp_path_factory.mktemp("aot"))
        subprocess.run([sys.executable, "-m", "serq_onnx.kernels.aot", "--out", aot_dir,
                        "--arch", str(10 * major + minor)], check=True, env=env, cwd=out)
    subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), json.dumps(CASES),
                    str(out), aot_dir], check=True, env=env, cwd=out)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_reference(results, name):
    K, N, r, gw, ga, bw, ba, M, dt, split = CASES[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=len(name), act_scale=True,
                       act_perm=np.int64, bias=True)
    got = np.load(results / f"{name}.npz")
    assert str(got["dtype"]) == f"torch.{dt}"
    check(case, got["A"], got["y"], dt, split or MAX_SPLIT)
    assert bool(got["same"]), "two runs differ: the kernels must be deterministic"


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_cubins_match_reference(results, name):
    """The shipped cubins, launched through the driver API as the manifest says."""
    K, N, r, gw, ga, bw, ba, M, dt, split = CASES[name]
    case = random_case(K, N, r, gw, ga, bw, ba, seed=len(name), act_scale=True,
                       act_perm=np.int64, bias=True)
    got = np.load(results / f"{name}.npz")
    assert str(got["dtype_cubin"]) == f"torch.{dt}"
    check(case, got["A"], got["y_cubin"], dt, split or MAX_SPLIT)
