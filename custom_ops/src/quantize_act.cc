#include "quantize_act.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace serq {

namespace {

bool RangeScalar(const float* x, int64_t n, float* lo, float* hi) {
  float l = *lo, h = *hi;
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(x[k])) return false;
    l = std::min(l, x[k]);
    h = std::max(h, x[k]);
  }
  *lo = l;
  *hi = h;
  return true;
}

// The reference divides; a reciprocal multiply differs in the last bit often enough to flip
// round-half cases, so every code costs a true division.
void CodesScalar(const float* x, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  for (int64_t k = 0; k < n; ++k) {
    float t = std::nearbyint(x[k] / scale) + zero;
    t = t < 0.0f ? 0.0f : (t > qmax ? qmax : t);
    out[k] = static_cast<uint8_t>(t);
  }
}

void GatherScaleScalar(const float* a, const int32_t* perm, const float* act_scale, int64_t n, float* x) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = a[perm ? perm[k] : k];
    x[k] = act_scale ? v * act_scale[k] : v;
  }
}

}  // namespace

QuantSpanKernels GetQuantSpanKernels(Isa isa) {
  QuantSpanKernels k{&RangeScalar, &CodesScalar, &GatherScaleScalar};
  if (isa != Isa::kScalar) X86QuantSpanKernels(Isa::kAvx2, &k);
  return k;
}

bool QuantizeActRow(const float* x, const SerqLayout& L, const QuantSpanKernels& kern, const QuantRowOut& out) {
  const int64_t K = L.a.K;
  const int64_t bs = L.block;
  const int64_t ga = L.group_a_eff;
  const float qmax = static_cast<float>((1 << L.a.bits_a) - 1);
  uint8_t* nat = out.codes;

  // Inactive (all-padding) blocks are never read; keep them defined anyway.
  for (int64_t b = 0; b < L.n_blocks; ++b) {
    out.blk_scale[b] = 0.0f;
    out.blk_zero[b] = 0;
  }

  // Main part: every block lies inside one activation group (group_a is 0, a multiple of
  // group_w, or a divisor of it), so per-group parameters map onto whole blocks.
  for (int64_t g0 = 0; g0 < K; g0 += ga) {
    const int64_t g1 = std::min(g0 + ga, K);
    float lo = 0.0f, hi = 0.0f;
    if (!kern.range(x + g0, g1 - g0, &lo, &hi)) {
      std::memset(out.codes, 0, static_cast<size_t>(L.K_ext));
      for (int64_t b = 0; b < L.n_blocks; ++b) {
        out.blk_scale[b] = std::numeric_limits<float>::quiet_NaN();
        if (out.blk_corr) out.blk_corr[b] = 0;
      }
      return false;
    }
    float scale = (hi - lo) / qmax;
    if (scale == 0.0f) scale = 1.0f;
    float zero = std::nearbyint(-lo / scale);
    zero = zero < 0.0f ? 0.0f : (zero > qmax ? qmax : zero);
    const int32_t izero = static_cast<int32_t>(zero);

    for (int64_t b = g0 / bs, b_end = CeilDiv(g1, bs); b < b_end; ++b) {
      out.blk_scale[b] = scale;
      out.blk_zero[b] = izero;
    }
    kern.codes(x + g0, g1 - g0, scale, zero, qmax, nat + g0);
  }

  // Padding rows K .. K_pad-1: the zero point of their (partially real) block, else 0.
  for (int64_t k = K; k < L.K_pad; ++k) {
    const int64_t b = k / bs;
    nat[k] = static_cast<uint8_t>(b < L.main_blocks ? out.blk_zero[b] : 0);
  }

  // Extended part: row K_pad + j repeats activation channel j (j < rank); block parameters are
  // those of the main block holding channel j; padding rows get the zero point as above.
  const int64_t r = L.a.rank;
  for (int64_t i = 0; i < L.ext_blocks; ++i) {
    out.blk_scale[L.ext_begin + i] = out.blk_scale[i];
    out.blk_zero[L.ext_begin + i] = out.blk_zero[i];
  }
  std::memcpy(nat + L.K_pad, nat, static_cast<size_t>(r));
  for (int64_t j = r; j < L.r_pad; ++j) {
    nat[L.K_pad + j] = static_cast<uint8_t>(j / bs < L.ext_blocks ? out.blk_zero[j / bs] : 0);
  }

  if (out.centered) {
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      const int32_t z = out.blk_zero[b];
      int32_t sum = 0;
      for (int64_t k = b * bs; k < (b + 1) * bs; ++k) {
        const int32_t c = static_cast<int32_t>(nat[k]) - z;
        nat[k] = static_cast<uint8_t>(static_cast<int8_t>(c));
        sum += c;
      }
      out.blk_corr[b] = 8 * sum;
    }
  } else if (out.blk_corr) {
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      int32_t sum = 0;
      for (int64_t k = b * bs; k < (b + 1) * bs; ++k) sum += nat[k];
      out.blk_corr[b] = 8 * sum;
    }
  }
  return true;
}

}  // namespace serq
