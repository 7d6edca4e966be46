// Column panels of the SerqMatMul weights, the layout the SIMD GEMMs read: for a panel of W
// columns (one int32 SIMD lane per column), a block's codes come as rows of W x 4 bytes in which
// lane c holds 4 consecutive codes of column c, so one u8 x s8 dot-product instruction
// (vpdpbusd, or pmaddubsw + pmaddwd) multiplies 4 activation codes, broadcast, by W columns and
// leaves each column's sum in its own lane: no horizontal reductions.
//
//   8-bit weights: row g of block i holds codes k0 + 4g .. k0 + 4g + 3 (two's complement).
//   4-bit weights: row g holds k0 + 8g .. k0 + 8g + 7: the low nibbles of lane c's bytes are
//                  codes k0 + 8g + t, the high nibbles k0 + 8g + 4 + t (t < 4), stored as
//                  code + 8 as in B; the GEMM subtracts 8 * sum(activation codes) per block.
//
// Panels come in groups of G (the register tile's width): one record per (group, active block)
// holds the block's codes, row g of all G panels side by side (G x W x 4 bytes per row), then the
// G x W weight scales, then (unless the kernel does not read them) the G x W wsum entries.
// Records follow each other group by group, block by block, so a tile reads its weights as one
// sequential stream -- what the hardware prefetchers follow best when a decode step streams
// every weight from memory. Only active blocks (holding real rows) are stored, in the order the
// op sums them: main blocks, then those of the salient part. Columns past N, up to the last
// whole group, are padding (code 0, scale 0, wsum 0).
#pragma once

#include <cstddef>
#include <cstdint>

#include "serq_layout.h"

namespace serq {

struct PanelLayout {
  int width = 0;              // columns per panel; 0: no panels (scalar kernel)
  int group = 0;              // panels per group (record)
  int64_t n_groups = 0;
  int64_t active_blocks = 0;  // main_blocks + ext_blocks
  int64_t block_bytes = 0;    // one panel's codes for one block: block * width (/ 2 for 4-bit)
  int64_t row_bytes = 0;      // one code row of a record: group * width * 4
  int64_t scales_at = 0;      // offsets inside a record
  int64_t wsum_at = 0;        // == record_bytes where the record has no wsum
  int64_t record_bytes = 0;

  size_t total_bytes() const { return static_cast<size_t>(n_groups * active_blocks * record_bytes); }
};

// Codes per panel row: 8 for 4-bit weights, 4 for 8-bit.
inline int64_t PanelRowCodes(const SerqLayout& L) { return L.a.bits_w == 4 ? 8 : 4; }
// Whether blocks split into whole panel rows (otherwise the scalar kernel runs).
inline bool PanelsFit(const SerqLayout& L) { return L.block % PanelRowCodes(L) == 0; }

// Block number (in n_blocks) of active block i.
inline int64_t ActiveBlock(const SerqLayout& L, int64_t i) {
  return i < L.main_blocks ? i : L.ext_begin + (i - L.main_blocks);
}

// `width` 0: no panels. `with_wsum`: whether records carry wsum.
PanelLayout MakePanelLayout(const SerqLayout& L, int width, int group, bool with_wsum);

// Packs B, scales and wsum (the op's inputs, already checked against the layout) into the
// records of panel groups [group0, group1) of `out` (P.total_bytes(), 64-byte aligned), so that
// callers can split the work.
void PackPanels(const SerqLayout& L, const PanelLayout& P, const uint8_t* B, const float* scales,
                const int32_t* wsum, int64_t group0, int64_t group1, uint8_t* out);

}  // namespace serq
