// Registration of the com.serq custom-op domain: the library's only exported symbol is
// RegisterCustomOps, called by onnxruntime (SessionOptions.register_custom_ops_library).
//
// SerqMatMul is registered once per (A type, act_perm type) pair: onnxruntime infers a custom
// op's output type from the overload whose declared input types match the node, and only one
// input of an op may be declared with an undefined ("any") type. Kernels for other execution
// providers (CUDA, when built with SERQ_BUILD_CUDA) are further ops with their own
// GetExecutionProviderType.
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "op_common.h"
#include "serq_matmul_cpu.h"
#ifdef SERQ_WITH_CUDA
#include "cuda/serq_matmul_cuda.h"
#endif

namespace serq {
namespace {

constexpr const char* kDomain = "com.serq";
constexpr const char* kOpName = "SerqMatMul";
constexpr int kOpVersion = 1;

// Everything but the kernel and the execution provider is common to every overload, so the
// CPU and CUDA ops have identical domain, version, inputs and type constraints.
template <typename TOp, typename TKernel, ONNXTensorElementDataType kTypeA, ONNXTensorElementDataType kTypePerm>
struct SerqMatMulOpBase : Ort::CustomOpBase<TOp, TKernel, true> {
  SerqMatMulOpBase() {
    this->start_ver_ = kOpVersion;
    this->end_ver_ = kOpVersion;
  }

  const char* GetName() const { return kOpName; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case kA: return kTypeA;
      case kB: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case kWsum: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case kActPerm: return kTypePerm;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // scales, act_scale, bias
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= kActScale ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return kTypeA; }
};

template <ONNXTensorElementDataType kTypeA, ONNXTensorElementDataType kTypePerm>
struct SerqMatMulCpuOp : SerqMatMulOpBase<SerqMatMulCpuOp<kTypeA, kTypePerm>, SerqMatMulCpuKernel, kTypeA, kTypePerm> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** op_kernel) const {
    return CreateSerqMatMulCpuKernel(info, op_kernel);
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

SerqMatMulCpuOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64> g_cpu_f32_i64;
SerqMatMulCpuOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32> g_cpu_f32_i32;
SerqMatMulCpuOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64> g_cpu_f16_i64;
SerqMatMulCpuOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32> g_cpu_f16_i32;

#ifdef SERQ_WITH_CUDA
template <ONNXTensorElementDataType kTypeA, ONNXTensorElementDataType kTypePerm>
struct SerqMatMulCudaOp
    : SerqMatMulOpBase<SerqMatMulCudaOp<kTypeA, kTypePerm>, cuda::SerqMatMulCudaKernel, kTypeA, kTypePerm> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** op_kernel) const {
    return cuda::CreateSerqMatMulCudaKernel(info, op_kernel,
                                            kTypeA == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cuda::DType::kF16
                                                                                             : cuda::DType::kF32,
                                            kTypePerm == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  // Only A lives on the device: the weights are validated and repacked on the host (once, when
  // they are constant initializers).
  OrtMemType GetInputMemoryType(size_t index) const { return index == kA ? OrtMemTypeDefault : OrtMemTypeCPUInput; }
};

SerqMatMulCudaOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64> g_cuda_f32_i64;
SerqMatMulCudaOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32> g_cuda_f32_i32;
SerqMatMulCudaOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64> g_cuda_f16_i64;
SerqMatMulCudaOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32> g_cuda_f16_i32;
#endif

// Domains must outlive every session that uses them; they are released when the library is
// unloaded.
void KeepDomain(Ort::CustomOpDomain&& domain) {
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;
  std::lock_guard<std::mutex> lock(mutex);
  domains.push_back(std::move(domain));
}

OrtStatus* Register(OrtSessionOptions* options) {
  Ort::CustomOpDomain domain{kDomain};
  domain.Add(&g_cpu_f32_i64);
  domain.Add(&g_cpu_f32_i32);
  domain.Add(&g_cpu_f16_i64);
  domain.Add(&g_cpu_f16_i32);
#ifdef SERQ_WITH_CUDA
  // Registered even where no GPU exists: onnxruntime only asks a provider it has for kernels.
  domain.Add(&g_cuda_f32_i64);
  domain.Add(&g_cuda_f32_i32);
  domain.Add(&g_cuda_f16_i64);
  domain.Add(&g_cuda_f16_i32);
#endif
  Ort::ThrowOnError(Ort::GetApi().AddCustomOpDomain(options, domain));
  KeepDomain(std::move(domain));
  return nullptr;
}

}  // namespace
}  // namespace serq

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (!api_base) return nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // This onnxruntime is older than the headers the library was built with; report it through
    // the oldest API table, which every version provides.
    const std::string msg = std::string("SerqMatMul: the op library needs onnxruntime API version ") +
                            std::to_string(ORT_API_VERSION) + " or newer, but the loaded onnxruntime is " +
                            api_base->GetVersionString();
    if (const OrtApi* oldest = api_base->GetApi(1)) return oldest->CreateStatus(ORT_FAIL, msg.c_str());
    std::fprintf(stderr, "%s\n", msg.c_str());
    return nullptr;
  }
  Ort::InitApi(api);
  try {
    return serq::Register(options);
  } catch (...) {
    return serq::StatusFromCurrentException("registering the com.serq ops");
  }
}
