#include "weight_check.h"

#include <cmath>
#include <cstdio>
#include <string>

namespace serq {

namespace {

std::string Str(int64_t v) { return std::to_string(v); }

std::string FloatStr(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  return buf;
}

// Sum of the codes k0 .. k0+bs-1 of one packed row (4-bit: nibble - 8, 8-bit: int8).
int64_t CodeSum(const uint8_t* row, int64_t bits_w, int64_t k0, int64_t bs) {
  int64_t sum = 0;
  if (bits_w == 4) {
    for (int64_t k = k0; k < k0 + bs; ++k) {
      const uint8_t byte = row[k / 2];
      sum += static_cast<int64_t>((k & 1) ? byte >> 4 : byte & 0x0F) - 8;
    }
  } else {
    for (int64_t k = k0; k < k0 + bs; ++k) sum += static_cast<int8_t>(row[k]);
  }
  return sum;
}

template <typename Index>
std::vector<int64_t> CheckPermTyped(const Index* p, int64_t K) {
  std::vector<int64_t> perm(static_cast<size_t>(K));
  std::vector<uint8_t> seen(static_cast<size_t>(K), 0);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t v = static_cast<int64_t>(p[j]);
    if (v < 0 || v >= K) {
      throw OpError("act_perm[" + Str(j) + "] = " + Str(v) + " is outside [0, K=" + Str(K) + ")");
    }
    if (seen[static_cast<size_t>(v)]) {
      throw OpError("act_perm is not a permutation: " + Str(v) + " appears twice");
    }
    seen[static_cast<size_t>(v)] = 1;
    perm[static_cast<size_t>(j)] = v;
  }
  return perm;
}

}  // namespace

void CheckWsum(const SerqLayout& L, const uint8_t* B, const int32_t* wsum) {
  for (int64_t n = 0; n < L.a.N; ++n) {
    const uint8_t* row = B + n * L.b_row_bytes;
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      const int64_t want = CodeSum(row, L.a.bits_w, b * L.block, L.block);
      const int32_t got = wsum[n * L.n_blocks + b];
      if (got != want) {
        throw OpError("wsum[" + Str(n) + ", " + Str(b) + "] = " + Str(got) + " does not match B: the codes of block " +
                      Str(b) + " (" + Str(L.block) + " codes) of column " + Str(n) + " sum to " + Str(want));
      }
    }
  }
}

void CheckScales(const SerqLayout& L, const float* scales) {
  const int64_t n_all = L.a.N * L.n_wgroups;
  for (int64_t i = 0; i < n_all; ++i) {
    const float v = scales[i];
    if (!(std::isfinite(v) && v > 0.0f)) {
      throw OpError("scales[" + Str(i / L.n_wgroups) + ", " + Str(i % L.n_wgroups) + "] = " + FloatStr(v) +
                    ": weight scales must be finite and positive");
    }
  }
}

std::vector<int64_t> CheckPerm(const void* data, bool is_int64, int64_t K) {
  return is_int64 ? CheckPermTyped(static_cast<const int64_t*>(data), K)
                  : CheckPermTyped(static_cast<const int32_t*>(data), K);
}

}  // namespace serq
