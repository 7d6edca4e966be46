#include "cuda/driver.h"

#include <dlfcn.h>

#include <mutex>

#include "serq_layout.h"

namespace serq {
namespace cuda {

std::string Driver::Error(CUresult rc, const char* what) const {
  const char* msg = nullptr;
  if (GetErrorString) GetErrorString(rc, &msg);
  return std::string(what) + " failed: CUresult " + std::to_string(static_cast<int>(rc)) + (msg ? std::string(" (") + msg + ")" : "");
}

void Driver::Check(CUresult rc, const char* what) const {
  if (rc != CUDA_SUCCESS) throw OpError(Error(rc, what));
}

namespace {

struct Loaded {
  Driver d;
  std::string error;
  bool ok = false;
};

template <typename F>
bool Sym(void* h, const char* name, F* out, std::string* error) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  if (!*out) *error = std::string("libcuda.so.1 has no ") + name + " (driver too old?)";
  return *out != nullptr;
}

Loaded Load() {
  Loaded L;
  // Never closed: the driver stays loaded for the process, as the CUDA runtime does.
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    L.error = std::string("cannot load the CUDA driver libcuda.so.1") + (e ? std::string(": ") + e : "");
    return L;
  }
  Driver& d = L.d;
  std::string& e = L.error;
  // Versioned names: cuda.h maps the API names onto these symbols.
  const bool ok = Sym(h, "cuInit", &d.Init, &e) && Sym(h, "cuGetErrorString", &d.GetErrorString, &e) &&
                  Sym(h, "cuDeviceGet", &d.DeviceGet, &e) && Sym(h, "cuDeviceGetAttribute", &d.DeviceGetAttribute, &e) &&
                  Sym(h, "cuDevicePrimaryCtxRetain", &d.DevicePrimaryCtxRetain, &e) &&
                  Sym(h, "cuDevicePrimaryCtxRelease_v2", &d.DevicePrimaryCtxRelease, &e) &&
                  Sym(h, "cuCtxGetCurrent", &d.CtxGetCurrent, &e) && Sym(h, "cuCtxPushCurrent_v2", &d.CtxPushCurrent, &e) &&
                  Sym(h, "cuCtxPopCurrent_v2", &d.CtxPopCurrent, &e) && Sym(h, "cuModuleLoadData", &d.ModuleLoadData, &e) &&
                  Sym(h, "cuModuleUnload", &d.ModuleUnload, &e) &&
                  Sym(h, "cuModuleGetFunction", &d.ModuleGetFunction, &e) &&
                  Sym(h, "cuFuncSetAttribute", &d.FuncSetAttribute, &e) && Sym(h, "cuLaunchKernel", &d.LaunchKernel, &e) &&
                  Sym(h, "cuMemcpyHtoD_v2", &d.MemcpyHtoD, &e) && Sym(h, "cuMemcpyHtoDAsync_v2", &d.MemcpyHtoDAsync, &e);
  if (!ok) return L;
  const CUresult rc = d.Init(0);
  if (rc != CUDA_SUCCESS) {
    L.error = d.Error(rc, "cuInit");
    return L;
  }
  L.ok = true;
  return L;
}

}  // namespace

const Driver* GetDriver(std::string* error) {
  static std::once_flag once;
  static Loaded* loaded = nullptr;
  std::call_once(once, [] { loaded = new Loaded(Load()); });
  if (!loaded->ok) {
    if (error) *error = loaded->error;
    return nullptr;
  }
  return &loaded->d;
}

ScopedContext::ScopedContext(const Driver& d, CUcontext ctx) : d_(d) {
  CUcontext cur = nullptr;
  d.Check(d.CtxGetCurrent(&cur), "cuCtxGetCurrent");
  if (cur != ctx) {
    d.Check(d.CtxPushCurrent(ctx), "cuCtxPushCurrent");
    pushed_ = true;
  }
}

ScopedContext::~ScopedContext() {
  if (pushed_) {
    CUcontext popped = nullptr;
    d_.CtxPopCurrent(&popped);
  }
}

}  // namespace cuda
}  // namespace serq
