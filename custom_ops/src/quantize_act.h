// Dynamic per-token, per-group asymmetric activation quantization (the op's activation
// quantizer), producing the codes and block parameters the integer GEMM consumes.
#pragma once

#include <cstdint>

#include "isa.h"
#include "serq_layout.h"

namespace serq {

// Everything the GEMM needs about one quantized row of X^ over the extended K.
struct QuantRowOut {
  uint8_t* codes;      // [K_ext], natural order
  float* blk_scale;    // [n_blocks]
  int32_t* blk_zero;   // [n_blocks]
  int32_t* blk_corr;   // nullable; [n_blocks] 8 * (sum of the block's codes), for GEMMs that
                       // multiply by the stored nibble (code + 8) instead of the code
  // Centered codes (4-bit activations only): codes[k] = int8(code - zero of its block), and
  // blk_corr = 8 * (sum of those). Then dot - zero * wsum = sum(centered * weight code) needs no
  // wsum: a GEMM multiplying the stored nibbles (u8) by the centered codes (s8) subtracts blk_corr.
  bool centered = false;
};

// Span kernels: min/max of x[0..n) folded into [lo, hi] (false if a value is not finite), and
// codes clip(rint(x / scale) + zero, 0, qmax), and X^ = A[perm] * act_scale of a float32 row.
struct QuantSpanKernels {
  bool (*range)(const float* x, int64_t n, float* lo, float* hi);
  void (*codes)(const float* x, int64_t n, float scale, float zero, float qmax, uint8_t* out);
  // x[k] = a[perm[k]] * act_scale[k] for k < n; perm and act_scale nullable
  void (*gather_scale)(const float* a, const int32_t* perm, const float* act_scale, int64_t n, float* x);
};

QuantSpanKernels GetQuantSpanKernels(Isa isa);
// x86 versions (quantize_act_x86.cc); returns false where the build has none.
bool X86QuantSpanKernels(Isa isa, QuantSpanKernels* out);

// x: one row of X^ (after act_perm / act_scale), K floats. Returns false (zero codes, NaN scales) if the row holds a NaN or an infinity:
// its output row is all NaN.
//
// Codes are bit-identical to reference.quantize_activations: float32 min/max including 0,
// scale = (hi - lo) / qmax (1 if 0), zero = clip(rint(-lo / scale)), q = clip(rint(x / scale) + zero),
// with IEEE division and round-half-to-even. Padding positions of partially padded blocks get the
// block's zero point, so they contribute exactly 0 whatever the weight codes there are.
bool QuantizeActRow(const float* x, const SerqLayout& L, const QuantSpanKernels& k, const QuantRowOut& out);

}  // namespace serq
