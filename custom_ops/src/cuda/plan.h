// Host side of the CUDA kernel of SerqMatMul: buffer geometry, launch plan and cubin choice,
// following kernels/layout.py, kernels/launch.py and the manifest tables. No CUDA header: the
// probe (custom_ops/src/cuda/probe) links this and prints plans for the tests to compare with
// the Python launcher.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/plan_tables.h"
#include "serq_layout.h"

namespace serq {
namespace cuda {

// kernels/layout.py KernelLayout.
struct Geometry {
  bool fast = false;
  int64_t unit = 0, half = 0, units_per_pair = 0, KX = 0, n_units = 0, n_pairs = 0, n_groups = 0, qmax = 0,
          off = 0;
};
Geometry GeometryOf(const SerqLayout& L);

enum class DType { kF32, kF16 };

// What is fixed for a node once its kernel exists.
struct NodeSpec {
  DType a = DType::kF32;
  bool has_perm = false, perm_i64 = false, has_scale = false, has_bias = false;
};

struct StepPlan {
  const StepSpec* step = nullptr;
  const KernelEntry* entry = nullptr;
  int64_t grid[3] = {1, 1, 1};
  std::vector<PlanValue> args;  // entry->args order
};

struct CallPlan {
  Quantities q;
  std::string gemm_class;  // "" on the generic path
  std::vector<int64_t> scratch_count;  // per Tables::scratch
  std::vector<StepPlan> steps;         // launch order, conditions already applied
};

// The manifest arch whose cubins load on a device of compute capability major.minor: same
// major, minor <= the device's, sm_XYa only on exactly X.Y; the highest such. 0 when none fits
// (*why then says what the library has).
int SelectArch(int major, int minor, std::string* why);

// Every name MakePlan needs for M rows (kernels/launch.py quantities()).
Quantities QuantitiesFor(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int64_t M,
                         std::string* gemm_class);

// The launches of one call for M rows on `arch`. Throws OpError when the shape cannot be
// launched safely (an i32 argument or grid dimension out of range, a missing variant, an
// argument whose buffer type differs from the cubin's parameter type).
CallPlan MakePlan(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int64_t M, int arch);

// Every entry a node of this layout can launch on `arch`, over all M (shape classes, split-K or
// not).
std::vector<const KernelEntry*> ReachableEntries(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int arch);

// Element type of a buffer as the manifest writes it ("*fp32", ...).
const char* BufferType(int buf, const SerqLayout& L, const NodeSpec& s);
const char* BufferName(int buf);

// The entry named `name` for `arch`, or nullptr.
const KernelEntry* FindEntry(const std::string& name, int arch);

}  // namespace cuda
}  // namespace serq
