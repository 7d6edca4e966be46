// Dynamic per-token, per-group asymmetric activation quantization (the op's activation
// quantizer), producing the codes in the order the integer GEMM consumes them.
#pragma once

#include <cstdint>

#include "isa.h"
#include "serq_layout.h"

namespace serq {

// Order of the activation codes within the extended row. The deinterleaved orders put the even k
// of each 32- or 64-code chunk first, then the odd k: that matches the low and high nibbles of
// the packed 4-bit weights, so the GEMM needs no byte shuffles.
enum class ActOrder { kNatural, kDeinterleave32, kDeinterleave64 };

inline int ActOrderChunk(ActOrder order) {
  return order == ActOrder::kDeinterleave32 ? 32 : (order == ActOrder::kDeinterleave64 ? 64 : 1);
}

// Everything the GEMM needs about one quantized row of X^ over the extended K.
struct QuantRowOut {
  uint8_t* codes;      // [K_ext], in the requested order
  float* blk_scale;    // block b at blk_scale[b * stride]
  int32_t* blk_zero;   // block b at blk_zero[b * stride]
  int32_t* blk_corr;   // nullable; 8 * (sum of the block's codes), for GEMMs that multiply by
                       // the stored nibble (code + 8) instead of the code
  int64_t stride;
};

// Span kernels: min/max of x[0..n) folded into [lo, hi] (false if a value is not finite), and
// codes clip(rint(x / scale) + zero, 0, qmax) in natural order.
struct QuantSpanKernels {
  bool (*range)(const float* x, int64_t n, float* lo, float* hi);
  void (*codes)(const float* x, int64_t n, float scale, float zero, float qmax, uint8_t* out);
  // natural -> deinterleaved order for n codes, n a multiple of chunk (32 or 64)
  void (*deinterleave)(const uint8_t* in, int64_t n, int chunk, uint8_t* out);
};

QuantSpanKernels GetQuantSpanKernels(Isa isa);
// x86 versions (quantize_act_x86.cc); returns false where the build has none.
bool X86QuantSpanKernels(Isa isa, QuantSpanKernels* out);

// x: one row of X^ (after act_perm / act_scale), K floats. `scratch` holds K_ext bytes (used for
// the deinterleaved orders). Returns false (zero codes, NaN scales) if the row holds a NaN or an infinity:
// its output row is all NaN.
//
// Codes are bit-identical to reference.quantize_activations: float32 min/max including 0,
// scale = (hi - lo) / qmax (1 if 0), zero = clip(rint(-lo / scale)), q = clip(rint(x / scale) + zero),
// with IEEE division and round-half-to-even. Padding positions of partially padded blocks get the
// block's zero point, so they contribute exactly 0 whatever the weight codes there are.
bool QuantizeActRow(const float* x, const SerqLayout& L, ActOrder order, const QuantSpanKernels& k,
                    const QuantRowOut& out, uint8_t* scratch);

}  // namespace serq
