"""Triton kernels of ``com.serq::SerqMatMul`` for NVIDIA GPUs and their ahead-of-time build.

Modules, one job each: :mod:`.layout` (buffer geometry), :mod:`.repack` (one-time weight
repack, numpy), :mod:`.quant` (activation quantization), :mod:`.gemm` (int8 tensor-core GEMM
and split-K reduction), :mod:`.generic` (CUDA-core GEMM for the layouts the fast path cannot
take), :mod:`.configs` (launch configurations), :mod:`.launch` (Python launchers on torch
tensors), :mod:`.aot` (cubins and manifest for the C++ launcher). Importing this package
imports neither Triton nor torch.
"""
