#include "weight_panels.h"

#include <cstring>

namespace serq {

PanelLayout MakePanelLayout(const SerqLayout& L, int width, int group, bool with_wsum) {
  PanelLayout P;
  if (width <= 0) return P;
  P.width = width;
  P.group = group > 0 ? group : 1;
  P.n_groups = CeilDiv(CeilDiv(L.a.N, width), P.group);
  P.active_blocks = L.main_blocks + L.ext_blocks;
  P.block_bytes = L.block * width / (L.a.bits_w == 4 ? 2 : 1);
  P.row_bytes = static_cast<int64_t>(P.group) * width * 4;
  const int64_t params = static_cast<int64_t>(P.group) * width * 4;  // G x W floats or int32
  P.scales_at = P.group * P.block_bytes;
  P.wsum_at = P.scales_at + params;
  P.record_bytes = P.wsum_at + (with_wsum ? params : 0);
  return P;
}

void PackPanels(const SerqLayout& L, const PanelLayout& P, const uint8_t* B, const float* scales,
                const int32_t* wsum, int64_t group0, int64_t group1, uint8_t* out) {
  const int64_t W = P.width, G = P.group, N = L.a.N, bs = L.block;
  const bool w4 = L.a.bits_w == 4;
  const bool with_wsum = P.record_bytes > P.wsum_at;
  const int64_t row_codes = PanelRowCodes(L);
  for (int64_t pg = group0; pg < group1; ++pg) {
    for (int64_t i = 0; i < P.active_blocks; ++i) {
      const int64_t b = ActiveBlock(L, i), k0 = b * bs;
      uint8_t* rec = out + (pg * P.active_blocks + i) * P.record_bytes;
      float* rec_scales = reinterpret_cast<float*>(rec + P.scales_at);
      int32_t* rec_wsum = reinterpret_cast<int32_t*>(rec + P.wsum_at);
      for (int64_t j = 0; j < G; ++j) {
        for (int64_t c = 0; c < W; ++c) {
          const int64_t lane = j * W + c;
          const int64_t n = (pg * G + j) * W + c;
          const bool real = n < N;
          rec_scales[lane] = real ? scales[n * L.n_wgroups + k0 / L.a.group_w] : 0.0f;
          if (with_wsum) rec_wsum[lane] = real ? wsum[n * L.n_blocks + b] : 0;
          const uint8_t* row = B + n * L.b_row_bytes;
          for (int64_t g = 0; g < bs / row_codes; ++g) {
            uint8_t* dst = rec + g * P.row_bytes + lane * 4;
            for (int t = 0; t < 4; ++t) {
              if (!real) {
                dst[t] = w4 ? 0x88 : 0;  // code 0
              } else if (w4) {
                const int64_t klo = k0 + g * 8 + t, khi = klo + 4;
                const uint8_t lo = (row[klo / 2] >> (4 * (klo & 1))) & 0x0F;
                const uint8_t hi = (row[khi / 2] >> (4 * (khi & 1))) & 0x0F;
                dst[t] = static_cast<uint8_t>(lo | (hi << 4));
              } else {
                dst[t] = row[k0 + g * 4 + t];
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace serq
