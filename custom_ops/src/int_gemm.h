// Integer GEMM of quantized activation rows with packed SerqMatMul weights.
//
// For every active block b, row m and column n:
//   y[m, n] += (a_scale[m, b] * w_scale[n, b]) * float(dot(qa[m, block], qw[n, block]) - a_zero[m, b] * wsum[n, b])
// with the dot product exact in int32 and the float operations in this order, so that every
// micro-kernel (scalar or SIMD) returns bit-identical results. Micro-kernels compute a tile of
// up to kTileRows rows by kTileCols columns.
#pragma once

#include <cstdint>

#include "isa.h"
#include "quantize_act.h"
#include "serq_layout.h"

namespace serq {

constexpr int kTileRows = 4;
constexpr int kTileCols = 2;

// Activation block parameters are stored per row tile: [M / kTileRows][n_blocks][kTileRows],
// so one tile's values for a block are contiguous.
inline int64_t ActParamIndex(int64_t m, int64_t b, int64_t n_blocks) {
  return ((m / kTileRows) * n_blocks + b) * kTileRows + m % kTileRows;
}

struct GemmProblem {
  const SerqLayout* L;
  const uint8_t* qa;        // [M, K_ext] activation codes, ordered as the micro-kernel needs
  const float* a_scale;     // ActParamIndex layout, rows padded to a multiple of kTileRows
  const int32_t* a_zero;    // same layout
  const int32_t* a_corr;    // same layout, QuantRowOut::blk_corr; only for kernels that need it
  const uint8_t* B;         // [N, b_row_bytes]
  const float* w_scales;    // [N, n_wgroups]
  const int32_t* wsum;      // [N, n_blocks]
};

// out[c * kTileRows + r] = result for row row0 + r (r < nrows) and column n0 + c (c < ncols),
// nrows in [1, kTileRows], ncols in [1, kTileCols]; row0 is a multiple of kTileRows.
using GemmTileFn = void (*)(const GemmProblem& p, int64_t row0, int nrows, int64_t n0, int ncols, float* out);

// out[c] = result for the single row `row` and column n0 + c, c < ncols <= kRowCols (decode).
constexpr int kRowCols = 8;
using GemmRowFn = void (*)(const GemmProblem& p, int64_t row, int64_t n0, int ncols, float* out);

struct GemmKernel {
  GemmTileFn tile;
  GemmRowFn row;    // nullable: single rows then go through `tile`
  ActOrder order;   // activation code order `tile` expects
  bool needs_corr;  // whether `tile` / `row` read GemmProblem::a_corr
  Isa isa;          // instruction set actually used (a block shape may force a lower one)
};

// The micro-kernel for this layout on (at most) `isa`.
GemmKernel SelectGemmKernel(const SerqLayout& L, Isa isa);

// Portable micro-kernel (natural code order); the definition of the result.
void GemmTileScalar(const GemmProblem& p, int64_t row0, int nrows, int64_t n0, int ncols, float* out);

// x86 micro-kernels (int_gemm_x86.cc); false where the build has none for this layout and isa.
bool X86GemmKernel(const SerqLayout& L, Isa isa, GemmKernel* out);

}  // namespace serq
