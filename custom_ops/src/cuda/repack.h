// One-time repack of the constant weights into the fast GEMM's layout: exactly
// kernels/repack.py repack_fast (the model file keeps reference.py's format).
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/plan.h"
#include "serq_layout.h"

namespace serq {
namespace cuda {

struct FastWeights {
  std::vector<int8_t> Bp;  // [N, KX / 2]: pair p, byte i = row p*2h+i (low nibble), p*2h+h+i (high)
  std::vector<float> sw;   // [n_units, N]: weight scale per unit, 0 in padding units
  std::vector<int32_t> ws; // [n_units, N]: sum of the codes of each unit
};

// B: uint8 [N, K_ext / 2] (4-bit codes, nibble = code + 8); scales: float32 [N, K_ext / group_w].
FastWeights RepackFast(const SerqLayout& L, const Geometry& g, const uint8_t* B, const float* scales);

}  // namespace cuda
}  // namespace serq
