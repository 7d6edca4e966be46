// Value checks of SerqMatMul's weight inputs (serq_onnx/reference.py, check_inputs): the kernel
// runs them once at creation on constant initializers, else on every call. Each throws OpError
// naming the first offending element.
#pragma once

#include <cstdint>
#include <vector>

#include "serq_layout.h"

namespace serq {

// wsum[n, b] must equal the sum of B's codes over block b of column n: the kernel subtracts
// zero_a * wsum, so a wrong entry would shift outputs silently.
void CheckWsum(const SerqLayout& L, const uint8_t* B, const int32_t* wsum);

// Weight scales must be finite and > 0 (the contract's "any positive scale").
void CheckScales(const SerqLayout& L, const float* scales);

// act_perm (int32 when !is_int64) must be a permutation of 0..K-1; returns it as int64.
std::vector<int64_t> CheckPerm(const void* data, bool is_int64, int64_t K);

}  // namespace serq
