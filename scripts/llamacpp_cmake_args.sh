#!/usr/bin/env bash
# CMAKE_ARGS for building llama-cpp-python on this x86 CPU without its AMX kernels: every
# instruction set the CPU reports (GGML_NATIVE=OFF, each one switched on by name), AMX left out.
# llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) crashed with SIGSEGV on the first Q4_1
# prompt on a Xeon VM that reports amx_int8 (llama-cpp-python 0.3.36); on CPUs without AMX the
# result is the same code -march=native would pick.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
[[ "$(uname -m)" == x86_64 ]] || { echo ""; exit 0; }
args="-DGGML_NATIVE=OFF"
has() { [[ "$flags" == *" $1 "* ]]; }
has avx && args+=" -DGGML_AVX=ON"
has avx2 && args+=" -DGGML_AVX2=ON"
has fma && args+=" -DGGML_FMA=ON"
has f16c && args+=" -DGGML_F16C=ON"
has bmi2 && args+=" -DGGML_BMI2=ON"
has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
if has avx512f && has avx512bw && has avx512vl; then
  args+=" -DGGML_AVX512=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
fi
echo "$args"
