// AVX2 and AVX512-VNNI micro-kernels, compiled with per-function target attributes and chosen at
// run time, so the library still loads on CPUs without them.
#include "int_gemm.h"

#include "x86_target.h"

namespace serq {

#ifdef SERQ_HAVE_X86_KERNELS


namespace {

// 32 four-bit codes from 16 packed bytes: low nibbles (even k) in the lower 128-bit lane, high
// nibbles (odd k) in the upper one, as signed codes (nibble - 8). The activations are stored in
// the matching ActOrder::kDeinterleave32 order.
SERQ_TARGET_AVX2 inline __m256i UnpackNibbles32(const uint8_t* packed) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i w = _mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0);
  return _mm256_sub_epi8(_mm256_and_si256(w, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

// Block-dot kernels: for rows r < NR and columns c < NC, s[c * RS + r] += int32 lanes whose sum
// is the exact dot product of row r and column c over the block starting at k0.

// 4-bit weights, block % 32 == 0, ActOrder::kDeinterleave32. maddubs(u8 activation, s8 code):
// |products| <= 255 * 8, so the pairwise int16 sums cannot saturate.
struct Avx2W4 {
  static constexpr bool kCorr = false;
  template <int NR, int NC, int RS>
  SERQ_TARGET_AVX2 static inline void Dots(const uint8_t* const* arow, const uint8_t* const* wrow, int64_t k0,
                                           int64_t bs, __m256i* s) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k = k0; k < k0 + bs; k += 32) {
      for (int c = 0; c < NC; ++c) {
        const __m256i w = UnpackNibbles32(wrow[c] + k / 2);
        for (int r = 0; r < NR; ++r) {
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k));
          s[c * RS + r] = _mm256_add_epi32(s[c * RS + r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones));
        }
      }
    }
  }
};

// 4-bit weights, block % 64 == 0, ActOrder::kDeinterleave64: 32 packed bytes give the 32 even
// codes (low nibbles) and the 32 odd ones (high nibbles) with one shift and two masks. The stored
// nibble (code + 8) is multiplied; the tile subtracts 8 * sum(activation codes) (kCorr).
SERQ_TARGET_AVX2 inline void SplitNibbles64(const uint8_t* packed, __m256i* lo, __m256i* hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(v, mask);
  *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

// maddubs products are <= 255 * 15: a pair sum <= 7650, two of them added <= 15300 < 32767.
struct Avx2W4N {
  static constexpr bool kCorr = true;
  template <int NR, int NC, int RS>
  SERQ_TARGET_AVX2 static inline void Dots(const uint8_t* const* arow, const uint8_t* const* wrow, int64_t k0,
                                           int64_t bs, __m256i* s) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k = k0; k < k0 + bs; k += 64) {
      for (int c = 0; c < NC; ++c) {
        __m256i lo, hi;
        SplitNibbles64(wrow[c] + k / 2, &lo, &hi);
        for (int r = 0; r < NR; ++r) {
          const __m256i ae = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k));
          const __m256i ao = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k + 32));
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(ae, lo), _mm256_maddubs_epi16(ao, hi));
          s[c * RS + r] = _mm256_add_epi32(s[c * RS + r], _mm256_madd_epi16(p, ones));
        }
      }
    }
  }
};

// 8-bit weights, block % 16 == 0, natural order. maddubs could saturate here
// (255 * 127 * 2 > 32767), so both operands are widened to int16 and multiplied with madd.
struct Avx2W8 {
  static constexpr bool kCorr = false;
  template <int NR, int NC, int RS>
  SERQ_TARGET_AVX2 static inline void Dots(const uint8_t* const* arow, const uint8_t* const* wrow, int64_t k0,
                                           int64_t bs, __m256i* s) {
    for (int64_t k = k0; k < k0 + bs; k += 16) {
      for (int c = 0; c < NC; ++c) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow[c] + k)));
        for (int r = 0; r < NR; ++r) {
          const __m256i a =
              _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(arow[r] + k)));
          s[c * RS + r] = _mm256_add_epi32(s[c * RS + r], _mm256_madd_epi16(a, w));
        }
      }
    }
  }
};

// VNNI, block % 32 == 0: dpbusd multiplies u8 x s8 and accumulates into int32 without
// intermediate saturation, for both weight widths (4-bit: kDeinterleave32, 8-bit: natural).
template <int kBitsW>
struct VnniDots {
  static constexpr bool kCorr = false;
  template <int NR, int NC, int RS>
  SERQ_TARGET_VNNI static inline void Dots(const uint8_t* const* arow, const uint8_t* const* wrow, int64_t k0,
                                           int64_t bs, __m256i* s) {
    for (int64_t k = k0; k < k0 + bs; k += 32) {
      for (int c = 0; c < NC; ++c) {
        const __m256i w = kBitsW == 4 ? UnpackNibbles32(wrow[c] + k / 2)
                                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[c] + k));
        for (int r = 0; r < NR; ++r) {
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k));
          s[c * RS + r] = _mm256_dpbusd_epi32(s[c * RS + r], a, w);
        }
      }
    }
  }
};

// VNNI, 4-bit weights, block % 64 == 0, as Avx2W4N.
struct VnniW4N {
  static constexpr bool kCorr = true;
  template <int NR, int NC, int RS>
  SERQ_TARGET_VNNI static inline void Dots(const uint8_t* const* arow, const uint8_t* const* wrow, int64_t k0,
                                           int64_t bs, __m256i* s) {
    for (int64_t k = k0; k < k0 + bs; k += 64) {
      for (int c = 0; c < NC; ++c) {
        __m256i lo, hi;
        SplitNibbles64(wrow[c] + k / 2, &lo, &hi);
        for (int r = 0; r < NR; ++r) {
          const __m256i ae = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k));
          const __m256i ao = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[r] + k + 32));
          s[c * RS + r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s[c * RS + r], ae, lo), ao, hi);
        }
      }
    }
  }
};

// Horizontal sums of 8 accumulators: lane i of the result = sum of the lanes of s[i].
SERQ_TARGET_AVX2 inline __m256i Reduce8(const __m256i* s) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// The block loops shared by the SIMD kernels are macros so that each copy is compiled for its
// target and the block-dot kernel inlines into it. The float combination runs on 8 lanes with
// the same operations, in the same order, as GemmTileScalar (bit-identical results).
// Iterates the active blocks b with their first code k0 and weight group g.
#define SERQ_FOR_ACTIVE_BLOCKS(...)                                                             \
  {                                                                                             \
    /* {first block, end block, weight group of the first block} */                            \
    const int64_t ranges[2][3] = {{0, L.main_blocks, 0},                                        \
                                  {L.ext_begin, L.ext_begin + L.ext_blocks, L.ext_wgroup}};     \
    const int64_t bpg = L.blocks_per_wgroup;                                                    \
    for (const auto& rg : ranges) {                                                             \
      int64_t g = rg[2], j = 0; /* advanced without a division per block */                     \
      for (int64_t b = rg[0]; b < rg[1]; ++b, j = (j + 1 == bpg) ? (++g, 0) : j + 1) {          \
        const int64_t k0 = b * L.block;                                                         \
        __VA_ARGS__                                                                             \
      }                                                                                         \
    }                                                                                           \
  }

// Tile of NR (<= 4) rows x 2 columns; lane c * 4 + r.
#define SERQ_TILE_4X2_BODY                                                                          \
  static_assert(kTileRows == 4 && kTileCols == 2, "the lane layout assumes a 4 x 2 tile");          \
  const SerqLayout& L = *p.L;                                                                       \
  const int64_t n1 = ncols > 1 ? n0 + 1 : n0; /* a missing second column repeats the first */       \
  const uint8_t* wrow[2] = {p.B + n0 * L.b_row_bytes, p.B + n1 * L.b_row_bytes};                    \
  const float* wsc[2] = {p.w_scales + n0 * L.n_wgroups, p.w_scales + n1 * L.n_wgroups};             \
  const int32_t* wsum[2] = {p.wsum + n0 * L.n_blocks, p.wsum + n1 * L.n_blocks};                    \
  const uint8_t* arow[NR];                                                                          \
  for (int r = 0; r < NR; ++r) arow[r] = p.qa + (row0 + r) * L.K_ext;                               \
  const int64_t ia0 = ActParamIndex(row0, 0, L.n_blocks);                                           \
  __m256 acc = _mm256_setzero_ps();                                                                 \
  SERQ_FOR_ACTIVE_BLOCKS({                                                                          \
    __m256i s[8];                                                                                   \
    for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_si256();                                      \
    D::template Dots<NR, 2, kTileRows>(arow, wrow, k0, L.block, s);                                 \
    const int64_t ia = ia0 + b * kTileRows;                                                         \
    __m256i dots = Reduce8(s);                                                                      \
    if (D::kCorr) {                                                                                 \
      dots = _mm256_sub_epi32(                                                                      \
          dots, _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.a_corr + ia)))); \
    }                                                                                               \
    const __m256 sa = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p.a_scale + ia));         \
    const __m256i za =                                                                              \
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.a_zero + ia))); \
    const __m256 sw = _mm256_setr_m128(_mm_set1_ps(wsc[0][g]), _mm_set1_ps(wsc[1][g]));             \
    const __m256i ws = _mm256_setr_m128i(_mm_set1_epi32(wsum[0][b]), _mm_set1_epi32(wsum[1][b]));   \
    const __m256i diff = _mm256_sub_epi32(dots, _mm256_mullo_epi32(za, ws));                        \
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(sa, sw), _mm256_cvtepi32_ps(diff)));       \
  })                                                                                                \
  _mm256_storeu_ps(out, acc);

// One row x 8 columns (decode); lane c. Columns past ncols repeat the last one.
#define SERQ_ROW_1X8_BODY                                                                           \
  const SerqLayout& L = *p.L;                                                                       \
  const uint8_t* wrow[8];                                                                           \
  const float* wsc[8];                                                                              \
  const int32_t* wsum[8];                                                                           \
  for (int c = 0; c < 8; ++c) {                                                                     \
    const int64_t n = n0 + (c < ncols ? c : ncols - 1);                                             \
    wrow[c] = p.B + n * L.b_row_bytes;                                                              \
    wsc[c] = p.w_scales + n * L.n_wgroups;                                                          \
    wsum[c] = p.wsum + n * L.n_blocks;                                                              \
  }                                                                                                 \
  const uint8_t* arow[1] = {p.qa + row * L.K_ext};                                                  \
  __m256 acc = _mm256_setzero_ps();                                                                 \
  SERQ_FOR_ACTIVE_BLOCKS({                                                                          \
    __m256i s[8];                                                                                   \
    for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_si256();                                      \
    D::template Dots<1, 8, 1>(arow, wrow, k0, L.block, s);                                          \
    const int64_t ia = ActParamIndex(row, b, L.n_blocks);                                           \
    __m256i dots = Reduce8(s);                                                                      \
    if (D::kCorr) dots = _mm256_sub_epi32(dots, _mm256_set1_epi32(p.a_corr[ia]));                   \
    const __m256 sa = _mm256_set1_ps(p.a_scale[ia]);                                                \
    const __m256i za = _mm256_set1_epi32(p.a_zero[ia]);                                             \
    const __m256 sw = _mm256_setr_ps(wsc[0][g], wsc[1][g], wsc[2][g], wsc[3][g], wsc[4][g], wsc[5][g], \
                                     wsc[6][g], wsc[7][g]);                                         \
    const __m256i ws = _mm256_setr_epi32(wsum[0][b], wsum[1][b], wsum[2][b], wsum[3][b], wsum[4][b], \
                                         wsum[5][b], wsum[6][b], wsum[7][b]);                       \
    const __m256i diff = _mm256_sub_epi32(dots, _mm256_mullo_epi32(za, ws));                        \
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(sa, sw), _mm256_cvtepi32_ps(diff)));       \
  })                                                                                                \
  _mm256_storeu_ps(out, acc);

template <int NR, class D>
SERQ_TARGET_AVX2 void TileAvx2(const GemmProblem& p, int64_t row0, int64_t n0, int ncols, float* out) {
  SERQ_TILE_4X2_BODY
}

template <int NR, class D>
SERQ_TARGET_VNNI void TileVnni(const GemmProblem& p, int64_t row0, int64_t n0, int ncols, float* out) {
  SERQ_TILE_4X2_BODY
}

template <class D>
SERQ_TARGET_AVX2 void RowAvx2(const GemmProblem& p, int64_t row, int64_t n0, int ncols, float* out) {
  SERQ_ROW_1X8_BODY
}

template <class D>
SERQ_TARGET_VNNI void RowVnni(const GemmProblem& p, int64_t row, int64_t n0, int ncols, float* out) {
  SERQ_ROW_1X8_BODY
}

#define SERQ_ROWS_DISPATCH(NAME, TILE, D)                                                        \
  void NAME(const GemmProblem& p, int64_t row0, int nrows, int64_t n0, int ncols, float* out) { \
    switch (nrows) {                                                                            \
      case 4: TILE<4, D>(p, row0, n0, ncols, out); break;                                       \
      case 3: TILE<3, D>(p, row0, n0, ncols, out); break;                                       \
      case 2: TILE<2, D>(p, row0, n0, ncols, out); break;                                       \
      default: TILE<1, D>(p, row0, n0, ncols, out); break;                                      \
    }                                                                                           \
  }

SERQ_ROWS_DISPATCH(TilesAvx2W4, TileAvx2, Avx2W4)
SERQ_ROWS_DISPATCH(TilesAvx2W4N, TileAvx2, Avx2W4N)
SERQ_ROWS_DISPATCH(TilesAvx2W8, TileAvx2, Avx2W8)
SERQ_ROWS_DISPATCH(TilesVnniW4, TileVnni, VnniDots<4>)
SERQ_ROWS_DISPATCH(TilesVnniW4N, TileVnni, VnniW4N)
SERQ_ROWS_DISPATCH(TilesVnniW8, TileVnni, VnniDots<8>)

}  // namespace

bool X86CpuSupports(Isa isa) {
  __builtin_cpu_init();  // also needed when called from a static constructor
  switch (isa) {
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default:
      return true;
  }
}

bool X86GemmKernel(const SerqLayout& L, Isa isa, GemmKernel* out) {
  if (!X86CpuSupports(isa)) return false;
  const int64_t bs = L.block;
  const bool w4 = L.a.bits_w == 4;
  if (isa == Isa::kAvx512Vnni) {
    if (w4 && bs % 64 == 0) {
      *out = GemmKernel{&TilesVnniW4N, &RowVnni<VnniW4N>, ActOrder::kDeinterleave64, true, isa};
    } else if (w4 && bs % 32 == 0) {
      *out = GemmKernel{&TilesVnniW4, &RowVnni<VnniDots<4>>, ActOrder::kDeinterleave32, false, isa};
    } else if (!w4 && bs % 32 == 0) {
      *out = GemmKernel{&TilesVnniW8, &RowVnni<VnniDots<8>>, ActOrder::kNatural, false, isa};
    } else {
      return false;
    }
    return true;
  }
  if (isa == Isa::kAvx2) {
    if (w4 && bs % 64 == 0) {
      *out = GemmKernel{&TilesAvx2W4N, &RowAvx2<Avx2W4N>, ActOrder::kDeinterleave64, true, isa};
    } else if (w4 && bs % 32 == 0) {
      *out = GemmKernel{&TilesAvx2W4, &RowAvx2<Avx2W4>, ActOrder::kDeinterleave32, false, isa};
    } else if (!w4 && bs % 16 == 0) {
      *out = GemmKernel{&TilesAvx2W8, &RowAvx2<Avx2W8>, ActOrder::kNatural, false, isa};
    } else {
      return false;
    }
    return true;
  }
  return false;
}

#else  // no x86 kernels in this build

bool X86CpuSupports(Isa isa) { return isa == Isa::kScalar; }
bool X86GemmKernel(const SerqLayout&, Isa, GemmKernel*) { return false; }

#endif

}  // namespace serq
