// Loading the embedded cubins (cuModuleLoadData, once per context and cubin, shared by every
// node) and launching a CallPlan with cuLaunchKernel on a given stream. The driver table is a
// parameter so that the probe can run this code against a recording stand-in.
#pragma once

#include <cuda.h>

#include <map>
#include <mutex>
#include <vector>

#include "cuda/driver.h"
#include "cuda/plan.h"

namespace serq {
namespace cuda {

// The functions one node uses in one context. Modules are reference-counted across nodes and
// unloaded with the last user.
class FunctionSet {
 public:
  FunctionSet(const Driver& d, CUcontext ctx) : d_(d), ctx_(ctx) {}
  ~FunctionSet();
  FunctionSet(const FunctionSet&) = delete;
  FunctionSet& operator=(const FunctionSet&) = delete;

  // Loads the cubin of `e` when this set does not hold it yet; ctx must be current. Throws OpError.
  CUfunction Get(const KernelEntry* e);

 private:
  const Driver& d_;
  CUcontext ctx_;
  std::mutex mu_;
  std::map<const KernelEntry*, CUfunction> fns_;
};

// Device addresses of the buffers a plan names (0: an absent optional input).
struct BufferAddresses {
  CUdeviceptr addr[kMaxBufs] = {};
};

// Checks every argument first (pointer alignment the cubins were compiled for), then launches
// the steps in order on `stream`. Never synchronizes. Throws OpError.
void Launch(const Driver& d, FunctionSet& fns, const CallPlan& plan, const BufferAddresses& bufs, CUstream stream);

// The kernelParams array of one step: one 8-byte slot per parameter (a CUdeviceptr, or an
// int32_t in its first 4 bytes), and pointers to them.
struct PackedArgs {
  std::vector<uint64_t> slots;
  std::vector<void*> params;
};
PackedArgs PackArgs(const StepPlan& step, const BufferAddresses& bufs);

}  // namespace cuda
}  // namespace serq
