#include "cuda/repack.h"

namespace serq {
namespace cuda {

FastWeights RepackFast(const SerqLayout& L, const Geometry& g, const uint8_t* B, const float* scales) {
  if (!g.fast) throw OpError("internal error: repack of a layout without a fast path");
  const int64_t N = L.a.N, KX = g.KX, h = g.half, U = g.unit;
  FastWeights w;
  w.Bp.assign(static_cast<size_t>(N * (KX / 2)), 0);
  w.sw.assign(static_cast<size_t>(g.n_units * N), 0.0f);
  w.ws.assign(static_cast<size_t>(g.n_units * N), 0);
  std::vector<int8_t> codes(static_cast<size_t>(KX));
  const int64_t n_real = L.K_ext / U;
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = B + n * (L.K_ext / 2);
    for (int64_t k = 0; k < KX; ++k) {
      codes[k] = k < L.K_ext ? static_cast<int8_t>(((k & 1) ? row[k / 2] >> 4 : row[k / 2] & 0x0F) - 8) : 0;
    }
    int8_t* out = w.Bp.data() + n * (KX / 2);
    for (int64_t p = 0; p < g.n_pairs; ++p) {
      for (int64_t i = 0; i < h; ++i) {
        const uint8_t lo = static_cast<uint8_t>(codes[p * 2 * h + i]) & 0x0F;
        const uint8_t hi = static_cast<uint8_t>(static_cast<uint8_t>(codes[p * 2 * h + h + i]) << 4);
        out[p * h + i] = static_cast<int8_t>(lo | hi);
      }
    }
    for (int64_t u = 0; u < g.n_units; ++u) {
      int32_t sum = 0;
      for (int64_t k = u * U; k < (u + 1) * U; ++k) sum += codes[k];
      w.ws[u * N + n] = sum;
      if (u < n_real) w.sw[u * N + n] = scales[n * L.n_wgroups + (u * U) / L.a.group_w];
    }
  }
  return w;
}

}  // namespace cuda
}  // namespace serq
