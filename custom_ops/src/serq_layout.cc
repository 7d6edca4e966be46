#include "serq_layout.h"

#include <limits>

namespace serq {

SerqLayout SerqLayout::FromAttrs(const SerqAttrs& attrs) {
  const SerqAttrs& a = attrs;
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.scheme != "int") {
    throw OpError("scheme '" + a.scheme + "' is not supported (supported: 'int'; 'mxfp4' is reserved)");
  }
  if (a.K < 1) throw OpError("attribute K must be >= 1, got " + s(a.K));
  if (a.N < 1) throw OpError("attribute N must be >= 1, got " + s(a.N));
  if (a.bits_w != 4 && a.bits_w != 8) throw OpError("attribute bits_w must be 4 or 8, got " + s(a.bits_w));
  if (a.bits_a != 4 && a.bits_a != 8) throw OpError("attribute bits_a must be 4 or 8, got " + s(a.bits_a));
  if (a.group_w < 2 || a.group_w % 2) {
    throw OpError("attribute group_w must be an even number >= 2, got " + s(a.group_w));
  }
  if (a.group_a < 0) throw OpError("attribute group_a must be >= 0 (0 = whole row), got " + s(a.group_a));
  if (a.group_a && a.group_a % a.group_w && a.group_w % a.group_a) {
    throw OpError("attribute group_a (" + s(a.group_a) + ") must be 0, a multiple of group_w (" +
                  s(a.group_w) + ") or a divisor of it");
  }
  if (a.rank < 0 || a.rank > a.K) {
    throw OpError("attribute rank must be in [0, K=" + s(a.K) + "], got " + s(a.rank));
  }
  // Keeps every index in range, and a block's dot - zero * wsum within int32
  // (|.| <= 2 * 255 * 128 * block).
  const struct {
    const char* name;
    int64_t value, max;
  } limits[] = {{"K", a.K, int64_t{1} << 24}, {"N", a.N, int64_t{1} << 31}, {"group_w", a.group_w, int64_t{1} << 14}};
  for (const auto& lim : limits) {
    if (lim.value > lim.max) {
      throw OpError(std::string("attribute ") + lim.name + " = " + s(lim.value) + " is too large for this kernel (at most " +
                    s(lim.max) + ")");
    }
  }

  SerqLayout L;
  L.a = a;
  L.K_pad = CeilTo(a.K, a.group_w);
  L.r_pad = CeilTo(a.rank, a.group_w);
  L.K_ext = L.K_pad + L.r_pad;
  L.block = a.group_a == 0 ? a.group_w : (a.group_a < a.group_w ? a.group_a : a.group_w);
  L.group_a_eff = a.group_a ? a.group_a : a.K;
  L.n_wgroups = L.K_ext / a.group_w;
  L.n_blocks = L.K_ext / L.block;
  L.b_row_bytes = a.bits_w == 4 ? L.K_ext / 2 : L.K_ext;
  L.main_blocks = CeilDiv(a.K, L.block);
  L.ext_begin = L.K_pad / L.block;
  L.ext_blocks = CeilDiv(a.rank, L.block);
  L.ext_wgroup = L.K_pad / a.group_w;
  L.blocks_per_wgroup = a.group_w / L.block;
  return L;
}

}  // namespace serq
