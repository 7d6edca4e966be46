// AVX2 span kernels of the activation quantizer. Bit-identical to the scalar ones:
// _mm256_div_ps is the IEEE division and _mm256_round_ps(_MM_FROUND_TO_NEAREST_INT) rounds half
// to even like nearbyint in the default rounding mode.
#include "quantize_act.h"

#include <cmath>

#include "x86_target.h"

namespace serq {

#ifdef SERQ_HAVE_X86_KERNELS

namespace {

SERQ_TARGET_AVX2 bool RangeAvx2(const float* x, int64_t n, float* lo, float* hi) {
  __m256 l = _mm256_set1_ps(*lo), h = _mm256_set1_ps(*hi);
  const __m256i exp_mask = _mm256_set1_epi32(0x7F800000);
  __m256i nonfinite = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exp_mask);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(e, exp_mask));
    l = _mm256_min_ps(l, v);
    h = _mm256_max_ps(h, v);
  }
  if (!_mm256_testz_si256(nonfinite, nonfinite)) return false;
  alignas(32) float lv[8], hv[8];
  _mm256_store_ps(lv, l);
  _mm256_store_ps(hv, h);
  float lo_s = lv[0], hi_s = hv[0];
  for (int i = 1; i < 8; ++i) {
    lo_s = lv[i] < lo_s ? lv[i] : lo_s;
    hi_s = hv[i] > hi_s ? hv[i] : hi_s;
  }
  for (; k < n; ++k) {
    if (!std::isfinite(x[k])) return false;
    lo_s = x[k] < lo_s ? x[k] : lo_s;
    hi_s = x[k] > hi_s ? x[k] : hi_s;
  }
  *lo = lo_s;
  *hi = hi_s;
  return true;
}

SERQ_TARGET_AVX2 inline __m256i Code8(const float* x, __m256 scale, __m256 zero, __m256 qmax) {
  __m256 t = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, zero), _mm256_setzero_ps()), qmax);
  return _mm256_cvttps_epi32(t);
}

SERQ_TARGET_AVX2 void CodesAvx2(const float* x, int64_t n, float scale, float zero, float qmax, uint8_t* out) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero), q = _mm256_set1_ps(qmax);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256i ab = _mm256_packs_epi32(Code8(x + k, s, z, q), Code8(x + k + 8, s, z, q));
    const __m256i cd = _mm256_packs_epi32(Code8(x + k + 16, s, z, q), Code8(x + k + 24, s, z, q));
    // packs/packus work per 128-bit lane: dwords come out as a0 b0 c0 d0 a1 b1 c1 d1.
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), bytes);
  }
  for (; k < n; ++k) {
    float t = std::nearbyint(x[k] / scale) + zero;
    t = t < 0.0f ? 0.0f : (t > qmax ? qmax : t);
    out[k] = static_cast<uint8_t>(t);
  }
}

// X^ = A[perm] * act_scale, 8 channels per step (vgatherdps where permuted); the product is the
// same IEEE multiplication as the scalar loop's.
SERQ_TARGET_AVX2 void GatherScaleAvx2(const float* a, const int32_t* perm, const float* act_scale, int64_t n, float* x) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 v = perm ? _mm256_i32gather_ps(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm + k)), 4)
                    : _mm256_loadu_ps(a + k);
    if (act_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(act_scale + k));
    _mm256_storeu_ps(x + k, v);
  }
  for (; k < n; ++k) {
    const float v = a[perm ? perm[k] : k];
    x[k] = act_scale ? v * act_scale[k] : v;
  }
}

}  // namespace

bool X86QuantSpanKernels(Isa isa, QuantSpanKernels* out) {
  if (isa == Isa::kScalar || !X86CpuSupports(Isa::kAvx2)) return false;
  *out = QuantSpanKernels{&RangeAvx2, &CodesAvx2, &GatherScaleAvx2};
  return true;
}

#else

bool X86QuantSpanKernels(Isa, QuantSpanKernels*) { return false; }

#endif

}  // namespace serq
