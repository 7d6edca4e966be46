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
#include "quantize_act.h"
#include "serq_layout.h"
#include "weight_panels.h"

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
  std::vector<int32_t> const_perm_;  // act_perm when validated_[5]

  SerqLayout L_;
  GemmKernel gemm_;
  QuantSpanKernels quant_;
  PanelLayout P_;
  // Panels of constant weights, packed once here (nullptr: none; fed weights are packed per call).
  std::vector<uint8_t> panel_store_;  // P_.total_bytes() + 64: records from a 64-byte boundary
  const uint8_t* panels_ = nullptr;
  Ort::MemoryInfo cpu_memory_{nullptr};
};

// CreateKernelV2 implementation shared by the registered overloads.
OrtStatusPtr CreateSerqMatMulCpuKernel(const OrtKernelInfo* info, void** op_kernel) noexcept;

}  // namespace serq
