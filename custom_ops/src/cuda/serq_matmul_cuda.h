// CUDA execution-provider kernel of com.serq::SerqMatMul (v1): the AOT-compiled Triton kernels
// of kernels/, embedded in the library, launched through the driver API on onnxruntime's
// compute stream. Never synchronizes and allocates only from onnxruntime's allocator, so CUDA
// graphs can capture it.
//
// The weight inputs (1..6) are declared as CPU inputs: constant initializers stay on the host,
// where they are validated (weight_check, as the CPU kernel does) and repacked once at kernel
// creation, then uploaded. Weights fed at run time are validated, repacked and uploaded on every
// call (correct, but with a host-side copy: not for CUDA graphs).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "cuda/driver.h"
#include "cuda/launcher.h"
#include "cuda/plan.h"
#include "op_common.h"

namespace serq {
namespace cuda {

class SerqMatMulCudaKernel {
 public:
  // Throws OpError or Ort::Exception (no driver, no fitting cubin, bad attributes or weights).
  SerqMatMulCudaKernel(const OrtKernelInfo* info, DType a, bool perm_i64);
  ~SerqMatMulCudaKernel();
  SerqMatMulCudaKernel(const SerqMatMulCudaKernel&) = delete;
  SerqMatMulCudaKernel& operator=(const SerqMatMulCudaKernel&) = delete;

  // Never throws: failures come back as an OrtStatus whose message starts with "SerqMatMul: ".
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);
  void Release() noexcept;
  CUdeviceptr UploadConstant(const void* host, size_t bytes);
  std::shared_ptr<const CallPlan> PlanFor(int64_t M, const NodeSpec& s);

  SerqLayout L_;
  Geometry g_;
  NodeSpec spec_;  // A's and act_perm's types; presence flags as the node has them at creation
  const Driver* d_ = nullptr;
  int device_id_ = 0;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;  // the device's primary context (the one onnxruntime's CUDA EP uses)
  int arch_ = 0;
  OrtAllocator* alloc_ = nullptr;           // the EP's device allocator (persistent buffers)
  const OrtMemoryInfo* mem_info_ = nullptr;  // owned by alloc_
  std::vector<void*> owned_;
  // Device copies of constant inputs by Buf id (kBufBp, kBufSw, kBufWs or kBufB, kBufScales;
  // kBufActPerm, kBufActScale, kBufBias), 0 where the input is fed per call or absent.
  CUdeviceptr const_addr_[kNumFixedBufs] = {};
  bool weights_const_ = false;
  const void* validated_[kNumInputs] = {};  // constant host data, checked and uploaded at creation
  std::unique_ptr<FunctionSet> fns_;
  std::mutex plan_mu_;
  std::map<std::pair<int64_t, int>, std::shared_ptr<const CallPlan>> plans_;
};

// CreateKernelV2 of the registered CUDA overloads.
OrtStatusPtr CreateSerqMatMulCudaKernel(const OrtKernelInfo* info, void** op_kernel, DType a, bool perm_i64) noexcept;

}  // namespace cuda
}  // namespace serq
