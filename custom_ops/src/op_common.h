// Code shared by the CPU and CUDA kernels of com.serq::SerqMatMul: attribute parsing, input
// views, the shape and type checks of every input and their messages, and OrtStatus creation.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#error "build with -DORT_API_MANUAL_INIT: the API table comes from the OrtApiBase given to RegisterCustomOps"
#endif
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "serq_layout.h"

namespace serq {

enum InputIndex : size_t { kA = 0, kB, kScales, kWsum, kActScale, kActPerm, kBias, kNumInputs };

struct TensorView {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

std::string ShapeStr(const std::vector<int64_t>& shape);
const char* TypeName(ONNXTensorElementDataType t);

// The op's attributes; throws OpError naming a missing or wrong-typed one.
SerqAttrs ReadAttrs(const Ort::ConstKernelInfo& info);

TensorView ViewOf(const Ort::ConstValue& value, size_t index);
TensorView GetInput(const Ort::KernelContext& ctx, size_t n_inputs, size_t index);
// The input's value when it is a constant initializer, else an absent view.
TensorView GetConstantInput(const Ort::ConstKernelInfo& info, size_t n_inputs, size_t index);

// Type and shape of input `index` (B .. bias), when present; throws OpError.
void CheckInputShape(const SerqLayout& L, size_t index, const TensorView& t);

// The node's constant-initializer inputs, checked once when the kernel is created: shapes and
// types, scales, wsum against B, act_perm. `validated[i]` is the data pointer of each input whose
// values were checked (Compute skips the value checks for those); `perm` is act_perm as int64.
struct ConstantInputs {
  TensorView view[kNumInputs];
  const void* validated[kNumInputs] = {};
  std::vector<int64_t> perm;
};
// Throws OpError; also for a node without the required inputs A, B, scales and wsum.
ConstantInputs CheckConstantInputs(const Ort::ConstKernelInfo& info, const SerqLayout& L);

// A's type and last dimension; returns the number of rows (product of the leading dimensions).
int64_t CheckActivations(const SerqLayout& L, const TensorView& A);

// Converts the exception being handled into an OrtStatus (call only inside a catch block).
OrtStatusPtr StatusFromCurrentException(const char* context) noexcept;

// The same, for kernel creation, with the node's name appended (a model holds one SerqMatMul
// per linear layer). Call only inside a catch block.
OrtStatusPtr StatusNamingNode(const OrtKernelInfo* info) noexcept;

}  // namespace serq
