#include "cuda/launcher.h"

#include <cstring>

namespace serq {
namespace cuda {

namespace {

constexpr int kDefaultSharedLimit = 48 * 1024;

struct ModuleKey {
  CUcontext ctx;
  const KernelEntry* entry;
  bool operator<(const ModuleKey& o) const { return ctx != o.ctx ? ctx < o.ctx : entry < o.entry; }
};
struct Module {
  CUmodule mod = nullptr;
  CUfunction fn = nullptr;
  int users = 0;
};

std::mutex& CacheMutex() {
  static std::mutex m;
  return m;
}
std::map<ModuleKey, Module>& Cache() {
  static auto* c = new std::map<ModuleKey, Module>();  // outlives static destructors
  return *c;
}

}  // namespace

CUfunction FunctionSet::Get(const KernelEntry* e) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = fns_.find(e);
  if (it != fns_.end()) return it->second;
  std::lock_guard<std::mutex> cache_lock(CacheMutex());
  Module& m = Cache()[ModuleKey{ctx_, e}];
  if (!m.mod) {
    CUmodule mod = nullptr;
    CUfunction fn = nullptr;
    CUresult rc = d_.ModuleLoadData(&mod, e->cubin);
    if (rc == CUDA_SUCCESS) rc = d_.ModuleGetFunction(&fn, mod, e->symbol);
    if (rc == CUDA_SUCCESS && e->shared > kDefaultSharedLimit) {
      rc = d_.FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, e->shared);
    }
    if (rc != CUDA_SUCCESS) {
      if (mod) d_.ModuleUnload(mod);
      Cache().erase(ModuleKey{ctx_, e});
      throw OpError(d_.Error(rc, (std::string("loading cubin ") + e->name + " (sm_" + std::to_string(e->arch) + ")").c_str()));
    }
    m.mod = mod;
    m.fn = fn;
  }
  ++m.users;
  fns_[e] = m.fn;
  return m.fn;
}

FunctionSet::~FunctionSet() {
  std::lock_guard<std::mutex> cache_lock(CacheMutex());
  for (const auto& kv : fns_) {
    auto it = Cache().find(ModuleKey{ctx_, kv.first});
    if (it == Cache().end()) continue;
    if (--it->second.users == 0) {
      d_.ModuleUnload(it->second.mod);
      Cache().erase(it);
    }
  }
}

PackedArgs PackArgs(const StepPlan& step, const BufferAddresses& bufs) {
  PackedArgs p;
  const size_t n = step.args.size();
  p.slots.assign(n, 0);
  p.params.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const PlanValue& v = step.args[i];
    if (step.entry->args[i].type[0] == '*') {
      const CUdeviceptr a = v.buf >= 0 ? bufs.addr[v.buf] : static_cast<CUdeviceptr>(v.i);
      static_assert(sizeof(CUdeviceptr) == sizeof(uint64_t), "CUdeviceptr is 64-bit");
      std::memcpy(&p.slots[i], &a, sizeof a);
    } else {
      const int32_t x = static_cast<int32_t>(v.i);  // range checked by MakePlan
      std::memcpy(&p.slots[i], &x, sizeof x);
    }
    p.params[i] = &p.slots[i];
  }
  return p;
}

void Launch(const Driver& d, FunctionSet& fns, const CallPlan& plan, const BufferAddresses& bufs, CUstream stream) {
  // Everything is checked and resolved before the first launch: a refused call leaves no
  // half-computed output behind a success.
  std::vector<CUfunction> f(plan.steps.size());
  std::vector<PackedArgs> packed(plan.steps.size());
  for (size_t s = 0; s < plan.steps.size(); ++s) {
    const StepPlan& st = plan.steps[s];
    for (size_t i = 0; i < st.args.size(); ++i) {
      const ArgSpec& a = st.entry->args[i];
      if (a.type[0] != '*' || !a.aligned16 || st.args[i].buf < 0) continue;
      const CUdeviceptr addr = bufs.addr[st.args[i].buf];
      if (addr % 16 != 0) {
        throw OpError(std::string("buffer ") + BufferName(st.args[i].buf) + " at address " + std::to_string(addr) +
                      " is not 16-byte aligned, as cubin " + st.entry->name + " requires for " + a.name);
      }
    }
    f[s] = fns.Get(st.entry);
    packed[s] = PackArgs(st, bufs);
  }
  for (size_t s = 0; s < plan.steps.size(); ++s) {
    const StepPlan& st = plan.steps[s];
    const CUresult rc = d.LaunchKernel(f[s], static_cast<unsigned>(st.grid[0]), static_cast<unsigned>(st.grid[1]),
                                       static_cast<unsigned>(st.grid[2]), static_cast<unsigned>(st.entry->threads), 1, 1,
                                       static_cast<unsigned>(st.entry->shared), stream, packed[s].params.data(), nullptr);
    if (rc != CUDA_SUCCESS) throw OpError(d.Error(rc, (std::string("cuLaunchKernel(") + st.entry->name + ")").c_str()));
  }
}

}  // namespace cuda
}  // namespace serq
