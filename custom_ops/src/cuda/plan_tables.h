// Tables generated from the AOT manifest (scripts/gen_cuda_embed.py -> serq_cuda_tables.cc):
// the launch plan of kernels/plan.py as C++ functions, and the embedded cubins with their
// launch metadata. Host-only: no CUDA header needed.
#pragma once

#include <cstddef>
#include <cstdint>

namespace serq {
namespace cuda {

// Every size and flag the plan's expressions name (kernels/launch.py, quantities()).
struct Quantities {
  int64_t M = 0, N = 0, K = 0, rank = 0, K_pad = 0, r_pad = 0, K_ext = 0, group_w = 0, block = 0,
          bits_w = 0;
  int64_t KX = 0, unit = 0, n_units = 0, n_pairs = 0, group_a_eff = 0, n_groups = 0, qmax = 0, off = 0,
          ldp = 0;
  int64_t has_perm = 0, has_scale = 0, has_bias = 0, n_split = 1, pairs_per_split = 1;
};

// Buffers an argument can name: the op's tensors and repacked weights, then the manifest's
// scratch buffers (kNumFixedBufs + index into Tables::scratch).
enum Buf : int {
  kBufA, kBufActPerm, kBufActScale, kBufBias, kBufY, kBufBp, kBufSw, kBufWs, kBufB, kBufScales,
  kNumFixedBufs
};
constexpr int kMaxBufs = 32;

// Value of one kernel argument: an integer, or a buffer (its device address at launch time).
struct PlanValue {
  int64_t i = 0;
  int buf = -1;
  static PlanValue Int(int64_t v) { return PlanValue{v, -1}; }
  static PlanValue Buffer(int b) { return PlanValue{0, b}; }
};

// Python's // and cdiv on the plan's (non-negative) sizes; a zero divisor sets *err.
inline int64_t FloorDiv(int64_t a, int64_t b, bool* err) {
  if (b == 0) {
    *err = true;
    return 0;
  }
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}
inline int64_t CeilDivChecked(int64_t a, int64_t b, bool* err) { return -FloorDiv(-a, b, err); }

using ArgFn = PlanValue (*)(const Quantities&, bool*);
using WhenFn = bool (*)(const Quantities&, bool*);
using CountFn = int64_t (*)(const Quantities&, bool*);
using GridFn = int64_t (*)(const Quantities&, const int64_t* cx, bool*);

struct KernelFn {
  const char* name;  // the Triton function, e.g. "serq_gemm_kernel"
  GridFn grid[3];
};

struct StepSpec {
  const char* path;  // "fast" / "generic"
  const char* step;
  int kernel;            // index into Tables::kernels
  const char* variant;   // name template over the tags of MakePlan
  WhenFn when;
  const ArgFn* args;     // in the kernel's cuLaunchKernel parameter order
  size_t n_args;
};

struct ScratchSpec {
  const char* name;
  const char* type;  // "*i8", "*i32", "*fp32"
  int64_t elem_size;
  CountFn count;
};

struct GemmClass {
  const char* name;
  int64_t m_max;  // 0: any M
  int64_t BM, BN, max_split;
};

struct FastUnit {
  int64_t unit, half, units_per_pair;
};

struct ArgSpec {
  const char* name;
  const char* type;  // "*fp32" ... pointers, "i32"
  bool aligned16;
};

struct KernelEntry {
  const char* name;
  int arch;                // 80, 89, 90
  const char* ptx_target;  // "sm_90a": loads on exactly that compute capability
  const char* symbol;
  int kernel;
  int threads;
  int shared;
  const ArgSpec* args;
  size_t n_args;
  int64_t cx[8];  // constexprs, in the order the kernel's grid functions read them
  const unsigned char* cubin;
  size_t cubin_size;
};

struct Tables {
  const KernelFn* kernels;
  size_t n_kernels;
  const StepSpec* steps;
  size_t n_steps;
  const ScratchSpec* scratch;
  size_t n_scratch;
  const GemmClass* gemm_classes;
  size_t n_gemm_classes;
  const FastUnit* fast_units;
  size_t n_fast_units;
  int64_t split_target_programs;
  int64_t min_pairs_per_split;
  int64_t (*quant_chunk)(int64_t group_a_eff);
  const KernelEntry* entries;
  size_t n_entries;
  const char* archs_json;
};

const Tables& GetTables();

}  // namespace cuda
}  // namespace serq
