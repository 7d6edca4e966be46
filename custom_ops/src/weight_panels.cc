#include "weight_panels.h"

namespace serq {

PanelLayout MakePanelLayout(const SerqLayout& L, int width) {
  PanelLayout P;
  if (width <= 0) return P;
  P.width = width;
  P.n_panels = CeilDiv(L.a.N, width);
  P.active_blocks = L.main_blocks + L.ext_blocks;
  P.block_bytes = L.block * width / (L.a.bits_w == 4 ? 2 : 1);
  return P;
}

void PackPanels(const SerqLayout& L, const PanelLayout& P, const uint8_t* B, const float* scales,
                const int32_t* wsum, int64_t panel0, int64_t panel1, uint8_t* codes, float* out_scales,
                int32_t* out_wsum) {
  const int64_t W = P.width, N = L.a.N, bs = L.block;
  const bool w4 = L.a.bits_w == 4;
  const int64_t row_codes = PanelRowCodes(L);
  for (int64_t p = panel0; p < panel1; ++p) {
    for (int64_t i = 0; i < P.active_blocks; ++i) {
      const int64_t b = ActiveBlock(L, i), k0 = b * bs;
      const int64_t slot = p * P.active_blocks + i;
      uint8_t* dst = codes + slot * P.block_bytes;
      for (int64_t c = 0; c < W; ++c) {
        const int64_t n = p * W + c;
        const bool real = n < N;
        out_scales[slot * W + c] = real ? scales[n * L.n_wgroups + k0 / L.a.group_w] : 0.0f;
        out_wsum[slot * W + c] = real ? wsum[n * L.n_blocks + b] : 0;
        const uint8_t* row = B + n * L.b_row_bytes;
        for (int64_t g = 0; g < bs / row_codes; ++g) {
          uint8_t* lane = dst + (g * W + c) * 4;
          for (int t = 0; t < 4; ++t) {
            if (!real) {
              lane[t] = w4 ? 0x88 : 0;  // code 0
            } else if (w4) {
              const int64_t klo = k0 + g * 8 + t, khi = klo + 4;
              const uint8_t lo = (row[klo / 2] >> (4 * (klo & 1))) & 0x0F;
              const uint8_t hi = (row[khi / 2] >> (4 * (khi & 1))) & 0x0F;
              lane[t] = static_cast<uint8_t>(lo | (hi << 4));
            } else {
              lane[t] = row[k0 + g * 4 + t];
            }
          }
        }
      }
    }
  }
}

}  // namespace serq
