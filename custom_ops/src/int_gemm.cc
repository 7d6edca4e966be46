#include "int_gemm.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#ifndef ORT_API_MANUAL_INIT
#error "build with -DORT_API_MANUAL_INIT"
#endif
#include <onnxruntime_cxx_api.h>

namespace serq {

namespace {

// Exact dot product of the activation codes a[0..bs) with weight codes k0 .. k0+bs-1 of the packed
// row `wrow`. With 4-bit weights an odd block size makes every other block start at an odd k,
// i.e. in the high nibble of a byte, and end in a low one.
template <int kBitsW>
inline int32_t BlockDotScalar(const uint8_t* a, const uint8_t* wrow, int64_t k0, int64_t bs) {
  int32_t dot = 0;
  if (kBitsW == 4) {
    const uint8_t* w = wrow + k0 / 2;
    int64_t i = 0;
    if (k0 & 1) {
      dot += static_cast<int32_t>(a[0]) * (static_cast<int32_t>(*w++ >> 4) - 8);
      i = 1;
    }
    for (; i + 2 <= bs; i += 2, ++w) {
      const int32_t lo = static_cast<int32_t>(*w & 0x0F) - 8;
      const int32_t hi = static_cast<int32_t>(*w >> 4) - 8;
      dot += static_cast<int32_t>(a[i]) * lo + static_cast<int32_t>(a[i + 1]) * hi;
    }
    if (i < bs) dot += static_cast<int32_t>(a[i]) * (static_cast<int32_t>(*w & 0x0F) - 8);
  } else {
    const uint8_t* w = wrow + k0;
    for (int64_t i = 0; i < bs; ++i) {
      dot += static_cast<int32_t>(a[i]) * static_cast<int32_t>(static_cast<int8_t>(w[i]));
    }
  }
  return dot;
}

template <int kBitsW>
void RegionScalar(const GemmProblem& p, const OutputSink& out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const SerqLayout& L = *p.L;
  const int64_t bs = L.block;
  const int64_t ranges[2][2] = {{0, L.main_blocks}, {L.ext_begin, L.ext_begin + L.ext_blocks}};
  constexpr int64_t kCols = 16;
  float vals[kCols];
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* arow = p.act.codes + m * L.K_ext;
    const float* sa_row = p.act.scale + m * L.n_blocks;
    const int32_t* za_row = p.act.zero + m * L.n_blocks;
    for (int64_t nc0 = n0; nc0 < n1; nc0 += kCols) {
      const int64_t nc = n1 - nc0 < kCols ? n1 - nc0 : kCols;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t n = nc0 + c;
        const uint8_t* wrow = p.B + n * L.b_row_bytes;
        const float* wsc = p.w_scales + n * L.n_wgroups;
        const int32_t* wsum = p.wsum + n * L.n_blocks;
        float acc = 0.0f;
        for (const auto& rg : ranges) {
          for (int64_t b = rg[0]; b < rg[1]; ++b) {
            const int64_t k0 = b * bs;
            const int32_t dot = BlockDotScalar<kBitsW>(arow + k0, wrow, k0, bs);
            // Wrapping arithmetic, as the SIMD kernels do (exact for contract-conforming data).
            const auto diff = static_cast<int32_t>(static_cast<uint32_t>(dot) -
                                                   static_cast<uint32_t>(za_row[b]) * static_cast<uint32_t>(wsum[b]));
            acc += (sa_row[b] * wsc[k0 / L.a.group_w]) * static_cast<float>(diff);
          }
        }
        vals[c] = acc;
      }
      StoreRow(out, m, nc0, nc, vals);
    }
  }
}

Isa IsaFromEnv(Isa detected) {
  const char* env = std::getenv("SERQ_ONNX_ISA");
  if (!env || !*env) return detected;
  Isa want = detected;
  if (!std::strcmp(env, "scalar")) want = Isa::kScalar;
  else if (!std::strcmp(env, "avx2")) want = Isa::kAvx2;
  else if (!std::strcmp(env, "avxvnni")) want = Isa::kAvxVnni;
  else if (!std::strcmp(env, "avx512vnni")) want = Isa::kAvx512Vnni;
  else if (!std::strcmp(env, "amx")) want = Isa::kAmx;
  return static_cast<int>(want) < static_cast<int>(detected) ? want : detected;
}

}  // namespace

void GemmRegionScalar(const GemmProblem& p, const OutputSink& out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (p.L->a.bits_w == 4) {
    RegionScalar<4>(p, out, m0, m1, n0, n1);
  } else {
    RegionScalar<8>(p, out, m0, m1, n0, n1);
  }
}

void StoreRow(const OutputSink& out, int64_t m, int64_t n0, int64_t ncols, const float* values) {
  const bool ok = out.row_ok[m] != 0;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (out.fp16) {
    auto* y = static_cast<Ort::Float16_t*>(out.Y) + m * out.N + n0;
    for (int64_t c = 0; c < ncols; ++c) {
      y[c] = Ort::Float16_t(ok ? (out.bias ? values[c] + out.bias[n0 + c] : values[c]) : nan);
    }
  } else {
    float* y = static_cast<float*>(out.Y) + m * out.N + n0;
    for (int64_t c = 0; c < ncols; ++c) y[c] = ok ? (out.bias ? values[c] + out.bias[n0 + c] : values[c]) : nan;
  }
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa DetectIsa() {
  Isa best = Isa::kScalar;
  if (X86CpuSupports(Isa::kAmx)) {
    best = Isa::kAmx;
  } else if (X86CpuSupports(Isa::kAvx512Vnni)) {
    best = Isa::kAvx512Vnni;
  } else if (X86CpuSupports(Isa::kAvxVnni)) {
    best = Isa::kAvxVnni;
  } else if (X86CpuSupports(Isa::kAvx2)) {
    best = Isa::kAvx2;
  }
  return IsaFromEnv(best);
}

GemmKernel SelectGemmKernel(const SerqLayout& L, Isa isa) {
  for (int level = static_cast<int>(isa); level > 0; --level) {
    GemmKernel k;
    if (X86GemmKernel(L, static_cast<Isa>(level), &k)) return k;
  }
  return GemmKernel{&GemmRegionScalar, 0, 0, 16, false, false, Isa::kScalar, 16, 0};
}

}  // namespace serq
