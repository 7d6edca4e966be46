// x86 panel GEMMs: AVX2 (pmaddubsw + pmaddwd, 8 columns per register), AVX-VNNI (vpdpbusd, 8
// columns), AVX512-VNNI (vpdpbusd, 16 columns per register) and AMX-INT8 (tiles, for prefill).
// Each is compiled with per-function target attributes and chosen at run time, so the library
// still loads on CPUs without them.
#include <cstring>

// GCC 12 warns inside its own avx512fintrin.h (_mm512_cvtepi32_ps builds on an undefined vector).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "int_gemm.h"
#include "x86_target.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace serq {

#ifdef SERQ_HAVE_X86_KERNELS

namespace {

namespace avx2 {
#define SERQ_T SERQ_TARGET_AVX2
struct Ops {
  // Tiles of 4 rows x 2 panels: 8 accumulators, 4 unpacked weight vectors and 2 broadcasts of
  // the 16 ymm registers. pmaddubsw saturates: no split-nibble row kernel.
  static constexpr int W = 8, kRows = 4, kGroup = 2;
  static constexpr bool kSplitNibbles = false;
  using I = __m256i;
  using F = __m256;
  SERQ_T static I Zero() { return _mm256_setzero_si256(); }
  SERQ_T static I Load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  SERQ_T static I LoadI(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  SERQ_T static void Unpack4(I v, I* lo, I* hi) {
    const I mask = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(v, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
  SERQ_T static I Bcast4(const uint8_t* a) {
    int32_t v;
    std::memcpy(&v, a, 4);
    return _mm256_set1_epi32(v);
  }
  // u8 x [0, 15]: each pmaddubsw pair sum is <= 2 * 255 * 15, two of them added <= 15300, so the
  // int16 sums cannot saturate.
  SERQ_T static I DotPair4(I s, I a0, I lo, I a1, I hi) {
    const I p = _mm256_add_epi16(_mm256_maddubs_epi16(a0, lo), _mm256_maddubs_epi16(a1, hi));
    return _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  // Stored nibbles (u8) times centered activations (s8, |c| <= 15): sums far from saturating.
  SERQ_T static I DotPair4C(I s, I a0, I lo, I a1, I hi) {
    const I p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
    return _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  // u8 x s8 could saturate pmaddubsw (2 * 255 * 128 > 32767): even and odd bytes are widened to
  // int16 and multiplied with pmaddwd instead.
  SERQ_T static I Dot8(I s, I a, I w) {
    const I ae = _mm256_and_si256(a, _mm256_set1_epi16(0x00FF)), ao = _mm256_srli_epi16(a, 8);
    const I we = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8), wo = _mm256_srai_epi16(w, 8);
    return _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(ae, we), _mm256_madd_epi16(ao, wo)));
  }
  SERQ_T static I Set1(int32_t v) { return _mm256_set1_epi32(v); }
  SERQ_T static I Add(I a, I b) { return _mm256_add_epi32(a, b); }
  SERQ_T static I Sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  SERQ_T static I MulLo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  SERQ_T static F ZeroF() { return _mm256_setzero_ps(); }
  SERQ_T static F LoadF(const float* p) { return _mm256_loadu_ps(p); }
  SERQ_T static void StoreF(float* p, F v) { _mm256_storeu_ps(p, v); }
  SERQ_T static F Set1F(float v) { return _mm256_set1_ps(v); }
  SERQ_T static F MulF(F a, F b) { return _mm256_mul_ps(a, b); }
  SERQ_T static F AddF(F a, F b) { return _mm256_add_ps(a, b); }
  SERQ_T static F Cvt(I v) { return _mm256_cvtepi32_ps(v); }
};
#include "panel_gemm_x86.inc"
#undef SERQ_T
}  // namespace avx2

namespace avxvnni {
#define SERQ_T SERQ_TARGET_AVXVNNI
// The AVX2 kernel with the VEX-encoded vpdpbusd (AVX-VNNI: CPUs with VNNI but without AVX-512).
// The AVX2 members inline here: their target is a subset of this one.
struct Ops : avx2::Ops {
  static constexpr bool kSplitNibbles = true;
  SERQ_T static I And(I a, I b) { return _mm256_and_si256(a, b); }
  SERQ_T static I Srai4(I a) { return _mm256_srai_epi32(a, 4); }
  // In-out asm operand as in the AVX-512 kernel; {vex} selects the AVX-VNNI encoding.
  SERQ_T static I Dpbusd(I s, I a, I w) {
    __asm__("%{vex%} vpdpbusd %[w], %[a], %[s]" : [s] "+x"(s) : [a] "x"(a), [w] "x"(w));
    return s;
  }
  SERQ_T static I DotPair4(I s, I a0, I lo, I a1, I hi) { return Dpbusd(Dpbusd(s, a0, lo), a1, hi); }
  // Centered activations (s8) times stored nibbles (u8).
  SERQ_T static I DotPair4C(I s, I a0, I lo, I a1, I hi) { return Dpbusd(Dpbusd(s, lo, a0), hi, a1); }
  SERQ_T static I Dot8(I s, I a, I w) { return Dpbusd(s, a, w); }
};
#include "panel_gemm_x86.inc"
#undef SERQ_T
}  // namespace avxvnni

namespace avx512 {
#define SERQ_T SERQ_TARGET_VNNI
struct Ops {
  // Tiles of 4 rows x 4 panels (64 columns): 16 accumulators, 8 unpacked weight vectors and 2
  // broadcasts of the 32 zmm registers; a panel group's code row is 4 cache lines.
  static constexpr int W = 16, kRows = 4, kGroup = 4;
  static constexpr bool kSplitNibbles = true;
  using I = __m512i;
  using F = __m512;
  SERQ_T static I And(I a, I b) { return _mm512_and_si512(a, b); }
  SERQ_T static I Srai4(I a) { return _mm512_srai_epi32(a, 4); }
  SERQ_T static I Zero() { return _mm512_setzero_si512(); }
  SERQ_T static I Load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  SERQ_T static I LoadI(const int32_t* p) { return _mm512_loadu_si512(p); }
  SERQ_T static void Unpack4(I v, I* lo, I* hi) {
    const I mask = _mm512_set1_epi8(0x0F);
    *lo = _mm512_and_si512(v, mask);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  }
  SERQ_T static I Bcast4(const uint8_t* a) {
    int32_t v;
    std::memcpy(&v, a, 4);
    return _mm512_set1_epi32(v);
  }
  // vpdpbusd: u8 x s8 products summed in 4s into int32, no intermediate saturation. Written as
  // asm with the accumulator as an in-out operand: through the intrinsic, GCC 12 copies every
  // accumulator once per instruction (a vmovdqa per vpdpbusd in the inner loop).
  SERQ_T static I Dpbusd(I s, I a, I w) {
    __asm__("vpdpbusd %[w], %[a], %[s]" : [s] "+v"(s) : [a] "v"(a), [w] "v"(w));
    return s;
  }
  SERQ_T static I DotPair4(I s, I a0, I lo, I a1, I hi) { return Dpbusd(Dpbusd(s, a0, lo), a1, hi); }
  // Centered activations (s8) times stored nibbles (u8).
  SERQ_T static I DotPair4C(I s, I a0, I lo, I a1, I hi) { return Dpbusd(Dpbusd(s, lo, a0), hi, a1); }
  SERQ_T static I Dot8(I s, I a, I w) { return Dpbusd(s, a, w); }
  SERQ_T static I Set1(int32_t v) { return _mm512_set1_epi32(v); }
  SERQ_T static I Add(I a, I b) { return _mm512_add_epi32(a, b); }
  SERQ_T static I Sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  SERQ_T static I MulLo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  SERQ_T static F ZeroF() { return _mm512_setzero_ps(); }
  SERQ_T static F LoadF(const float* p) { return _mm512_loadu_ps(p); }
  SERQ_T static void StoreF(float* p, F v) { _mm512_storeu_ps(p, v); }
  SERQ_T static F Set1F(float v) { return _mm512_set1_ps(v); }
  SERQ_T static F MulF(F a, F b) { return _mm512_mul_ps(a, b); }
  SERQ_T static F AddF(F a, F b) { return _mm512_add_ps(a, b); }
  SERQ_T static F Cvt(I v) { return _mm512_cvtepi32_ps(v); }
};
#include "panel_gemm_x86.inc"
#undef SERQ_T
}  // namespace avx512

namespace amx {
#define SERQ_T SERQ_TARGET_AMX
#include "panel_gemm_amx.inc"
#undef SERQ_T
}  // namespace amx

template <class Ops>
GemmKernel Make(GemmRegionFn run, bool w4, bool centered, Isa isa) {
  return GemmKernel{run, Ops::W, Ops::kGroup, Ops::W * Ops::kGroup, w4, centered, isa, 16, 0};
}

// Linux gives a process the AMX tile state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); the permission then holds for all its threads.
bool AmxPermitted() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

}  // namespace

bool X86CpuSupports(Isa isa) {
  __builtin_cpu_init();  // also needed when called from a static constructor
  switch (isa) {
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::kAmx:
      return X86CpuSupports(Isa::kAvx512Vnni) && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-int8") && AmxPermitted();
    default:
      return true;
  }
}

bool X86GemmKernel(const SerqLayout& L, Isa isa, GemmKernel* out) {
  if (!X86CpuSupports(isa) || !PanelsFit(L)) return false;
  const bool w4 = L.a.bits_w == 4;
  // 4-bit weights and activations: centered activation codes fit s8 and spare the epilogue wsum.
  const bool c = w4 && L.a.bits_a == 4;
  if (isa == Isa::kAmx) {
    if (!amx::AmxFits(L)) return false;
    *out = Make<avx512::Ops>(c ? &amx::Region<4, true> : w4 ? &amx::Region<4, false> : &amx::Region<8, false>, w4, c, isa);
    // Tasks of many rows: the unpacked weights are shared by all of them; and activation rows
    // are read in whole tiles of 16.
    out->task_rows = static_cast<int>(amx::kPassRows);
    out->pad_rows = amx::kTileRows;
    return true;
  }
  if (isa == Isa::kAvx512Vnni) {
    *out = Make<avx512::Ops>(c ? &avx512::Region<4, true> : w4 ? &avx512::Region<4, false> : &avx512::Region<8, false>, w4, c, isa);
    return true;
  }
  if (isa == Isa::kAvxVnni) {
    *out = Make<avxvnni::Ops>(c ? &avxvnni::Region<4, true> : w4 ? &avxvnni::Region<4, false> : &avxvnni::Region<8, false>, w4, c, isa);
    return true;
  }
  if (isa == Isa::kAvx2) {
    *out = Make<avx2::Ops>(c ? &avx2::Region<4, true> : w4 ? &avx2::Region<4, false> : &avx2::Region<8, false>, w4, c, isa);
    return true;
  }
  return false;
}

#else  // no x86 kernels in this build

bool X86CpuSupports(Isa isa) { return isa == Isa::kScalar; }
bool X86GemmKernel(const SerqLayout&, Isa, GemmKernel*) { return false; }

#endif

}  // namespace serq
