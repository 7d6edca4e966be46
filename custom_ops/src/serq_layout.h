// Attributes and derived sizes of com.serq::SerqMatMul (v1); see serq_onnx/reference.py for the
// contract these mirror.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace serq {

// Errors raised by the op; the message is reported to onnxruntime as is.
class OpError : public std::runtime_error {
 public:
  explicit OpError(const std::string& what) : std::runtime_error("SerqMatMul: " + what) {}
};

struct SerqAttrs {
  int64_t K = 0;
  int64_t N = 0;
  int64_t rank = 0;
  int64_t group_w = 0;
  int64_t group_a = 0;
  int64_t bits_a = 0;
  int64_t bits_w = 0;
  std::string scheme = "int";
};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t CeilTo(int64_t a, int64_t m) { return CeilDiv(a, m) * m; }

struct SerqLayout {
  SerqAttrs a;
  int64_t K_pad = 0;        // main weight rows, K rounded up to group_w
  int64_t r_pad = 0;        // salient-correction rows, rank rounded up to group_w
  int64_t K_ext = 0;        // K_pad + r_pad
  int64_t block = 0;        // span with constant activation and weight scale
  int64_t group_a_eff = 0;  // activation group (K when group_a == 0)
  int64_t n_wgroups = 0;    // K_ext / group_w: scales per column
  int64_t n_blocks = 0;     // K_ext / block: wsum entries per column
  int64_t b_row_bytes = 0;  // bytes of B per column
  // Blocks holding real rows; blocks wholly in padding contribute nothing and are skipped.
  int64_t main_blocks = 0;  // blocks [0, main_blocks)
  int64_t ext_begin = 0;    // first block of the extended part (K_pad / block)
  int64_t ext_blocks = 0;   // blocks [ext_begin, ext_begin + ext_blocks)
  int64_t ext_wgroup = 0;   // weight group of block ext_begin (K_pad / group_w)
  int64_t blocks_per_wgroup = 0;  // group_w / block

  // Throws OpError when the attributes break the contract.
  static SerqLayout FromAttrs(const SerqAttrs& attrs);
};

}  // namespace serq
