// CPU execution-provider kernel of com.serq::SerqMatMul (v1).
#pragma once

#ifndef ORT_API_MANUAL_INIT
#error "build with -DORT_API_MANUAL_INIT: the API table comes from the OrtApiBase given to RegisterCustomOps"
#endif
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <vector>

#include "int_gemm.h"
#include "op_common.h"
#include "serq_layout.h"

namespace serq {

class SerqMatMulCpuKernel {
 public:
  // Reads and validates the attributes, and the weight inputs that are constant initializers;
  // throws OpError or Ort::Exception.
  explicit SerqMatMulCpuKernel(const OrtKernelInfo* info);

  // Never throws: failures come back as an OrtStatus whose message starts with "SerqMatMul: ".
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

  const SerqLayout& layout() const { return L_; }

 private:
  void Compute(OrtKernelContext* context) const;

  // Data of the inputs (by index) that were constant initializers when the kernel was created and
  // passed the value checks then; nullptr where the check runs on every call instead.
  const void* validated_[7] = {};
  std::vector<int64_t> const_perm_;  // act_perm as int64 when validated_[5]

  SerqLayout L_;
  GemmKernel gemm_;
  QuantSpanKernels quant_;
};

// CreateKernelV2 implementation shared by the registered overloads.
OrtStatusPtr CreateSerqMatMulCpuKernel(const OrtKernelInfo* info, void** op_kernel) noexcept;

}  // namespace serq
