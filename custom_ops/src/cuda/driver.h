// The CUDA driver API entry points the CUDA kernel uses, opened with dlopen("libcuda.so.1") on
// first use: the library links neither the driver nor the runtime, so it loads (and its CPU op
// runs) on machines without either. Types and prototypes come from the cuda.h that ships in
// the triton wheel.
#pragma once

#include <cuda.h>

#include <string>

namespace serq {
namespace cuda {

struct Driver {
  decltype(&::cuInit) Init = nullptr;
  decltype(&::cuGetErrorString) GetErrorString = nullptr;
  decltype(&::cuDeviceGet) DeviceGet = nullptr;
  decltype(&::cuDeviceGetAttribute) DeviceGetAttribute = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) DevicePrimaryCtxRelease = nullptr;
  decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&::cuCtxPushCurrent) CtxPushCurrent = nullptr;
  decltype(&::cuCtxPopCurrent) CtxPopCurrent = nullptr;
  decltype(&::cuModuleLoadData) ModuleLoadData = nullptr;
  decltype(&::cuModuleUnload) ModuleUnload = nullptr;
  decltype(&::cuModuleGetFunction) ModuleGetFunction = nullptr;
  decltype(&::cuFuncSetAttribute) FuncSetAttribute = nullptr;
  decltype(&::cuLaunchKernel) LaunchKernel = nullptr;
  decltype(&::cuMemcpyHtoD) MemcpyHtoD = nullptr;
  decltype(&::cuMemcpyHtoDAsync) MemcpyHtoDAsync = nullptr;

  // "what: CUDA_ERROR_xxx (message)".
  std::string Error(CUresult rc, const char* what) const;
  // Throws OpError unless rc is CUDA_SUCCESS.
  void Check(CUresult rc, const char* what) const;
};

// The process's driver table, loaded and cuInit-ed once; nullptr (and *error) when libcuda.so.1
// or one of its symbols is missing or cuInit fails. Thread-safe.
const Driver* GetDriver(std::string* error);

// Makes `ctx` current for a scope unless it already is (kernel creation and onnxruntime's
// compute threads normally have it current already).
class ScopedContext {
 public:
  ScopedContext(const Driver& d, CUcontext ctx);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  const Driver& d_;
  bool pushed_ = false;
};

}  // namespace cuda
}  // namespace serq
