// Integer GEMM of quantized activation rows with SerqMatMul weights.
//
// For every active block b, row m and column n:
//   y[m, n] += (a_scale[m, b] * w_scale[n, b]) * float(dot(qa[m, block], qw[n, block]) - a_zero[m, b] * wsum[n, b])
// with the dot product exact in int32 (wrapping) and the float operations in this order, blocks
// in the order main then salient, so that every kernel (scalar or SIMD) returns bit-identical
// results. The scalar kernel reads the op's B as stored; the SIMD kernels read column panels
// (weight_panels.h).
#pragma once

#include <cstdint>

#include "isa.h"
#include "serq_layout.h"
#include "weight_panels.h"

namespace serq {

// The quantized activation rows (quantize_act.h), row-major.
struct ActRows {
  const uint8_t* codes;   // [M, K_ext], codes in natural order
  const float* scale;     // [M, n_blocks]
  const int32_t* zero;    // [M, n_blocks]
  const int32_t* corr;    // [M, n_blocks]: 8 * sum of the block's codes (4-bit panel kernels), or nullptr
                          // (codes and corr centered for kernels that say so)
};

struct GemmProblem {
  const SerqLayout* L;
  ActRows act;
  // The op's weight inputs (scalar kernel).
  const uint8_t* B;         // [N, b_row_bytes]
  const float* w_scales;    // [N, n_wgroups]
  const int32_t* wsum;      // [N, n_blocks]
  // The same weights as panel records (SIMD kernels).
  PanelLayout P;
  const uint8_t* panels;
};

// Where results go: Y[m, n] = (row_ok[m] ? value (+ bias[n]) : NaN), float32 or float16.
struct OutputSink {
  void* Y;
  bool fp16;
  int64_t N;
  const float* bias;      // nullable
  const uint8_t* row_ok;  // [M]
};
// Stores values[0 .. ncols) of row m at columns n0 ..; the one place output is written.
void StoreRow(const OutputSink& out, int64_t m, int64_t n0, int64_t ncols, const float* values);

// Computes and stores rows [m0, m1) x columns [n0, n1); n0 is a multiple of the kernel's
// column unit.
using GemmRegionFn = void (*)(const GemmProblem& p, const OutputSink& out, int64_t m0, int64_t m1,
                              int64_t n0, int64_t n1);

struct GemmKernel {
  GemmRegionFn run;
  int panel_width;  // columns per panel; 0: reads B as stored
  int panel_group;  // panels per record (the register tile's width in panels)
  int tile_cols;    // columns of one register tile; work splits at multiples of it
  bool needs_corr;  // whether it reads ActRows::corr
  bool centered;    // whether it reads centered activation codes (QuantRowOut::centered)
  Isa isa;          // instruction set actually used (a block shape may force a lower one)
  int task_rows;    // rows per task of the caller's work split
  int pad_rows;     // rows of activation codes past M it may read (never uses): scratch to reserve
};

// The kernel for this layout on (at most) `isa`.
GemmKernel SelectGemmKernel(const SerqLayout& L, Isa isa);

// Portable kernel; the definition of the result.
void GemmRegionScalar(const GemmProblem& p, const OutputSink& out, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// x86 panel kernels (int_gemm_x86.cc); false where the build or CPU has none for this layout and isa.
bool X86GemmKernel(const SerqLayout& L, Isa isa, GemmKernel* out);

}  // namespace serq
