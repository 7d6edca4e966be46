// CPU execution-provider kernel of com.serq::SerqMatMul (v1).
#pragma once

#ifndef ORT_API_MANUAL_INIT
#error "build with -DORT_API_MANUAL_INIT: the API table comes from the OrtApiBase given to RegisterCustomOps"
#endif
#include <onnxruntime_cxx_api.h>

#include "int_gemm.h"
#include "serq_layout.h"

namespace serq {

class SerqMatMulCpuKernel {
 public:
  // Reads and validates the attributes; throws OpError or Ort::Exception.
  explicit SerqMatMulCpuKernel(const OrtKernelInfo* info);

  // Never throws: failures come back as an OrtStatus whose message starts with "SerqMatMul: ".
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

  const SerqLayout& layout() const { return L_; }

 private:
  void Compute(OrtKernelContext* context) const;

  SerqLayout L_;
  GemmKernel gemm_;
  QuantSpanKernels quant_;
};

// CreateKernelV2 implementation shared by the registered overloads.
OrtStatusPtr CreateSerqMatMulCpuKernel(const OrtKernelInfo* info, void** op_kernel) noexcept;

// Converts the exception being handled into an OrtStatus (call only inside a catch block).
OrtStatusPtr StatusFromCurrentException(const char* context) noexcept;

}  // namespace serq
