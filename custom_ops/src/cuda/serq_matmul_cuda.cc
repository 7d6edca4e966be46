#include "cuda/serq_matmul_cuda.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "call_scratch.h"
#include "cuda/repack.h"
#include "weight_check.h"

namespace serq {
namespace cuda {

namespace {

constexpr size_t kAlign = 256;
constexpr size_t kMaxCachedPlans = 256;

bool InputPresent(const Ort::ConstKernelInfo& info, size_t n_inputs, size_t i) {
  return i < n_inputs && !info.GetInputName(i).empty();
}

bool Verbose() {
  const char* v = std::getenv("SERQ_ONNX_VERBOSE");
  return v && *v && std::strcmp(v, "0") != 0;
}

}  // namespace

SerqMatMulCudaKernel::SerqMatMulCudaKernel(const OrtKernelInfo* info_ptr, DType a, bool perm_i64) {
  Ort::ConstKernelInfo info{info_ptr};
  const OrtApi& api = Ort::GetApi();
  L_ = SerqLayout::FromAttrs(ReadAttrs(info));
  g_ = GeometryOf(L_);
  const size_t n_inputs = info.GetInputCount();
  if (n_inputs < kActScale) {
    throw OpError("inputs A, B, scales and wsum are required, the node has " + std::to_string(n_inputs) + " inputs");
  }
  spec_.a = a;
  spec_.perm_i64 = perm_i64;
  spec_.has_scale = InputPresent(info, n_inputs, kActScale);
  spec_.has_perm = InputPresent(info, n_inputs, kActPerm);
  spec_.has_bias = InputPresent(info, n_inputs, kBias);

  // Attributes and weights are checked before the driver is touched: a malformed model gives
  // the same message on every machine.
  const ConstantInputs constants = CheckConstantInputs(info, L_);
  const TensorView* c = constants.view;
  std::copy(std::begin(constants.validated), std::end(constants.validated), validated_);
  if (c[kActScale].present) validated_[kActScale] = c[kActScale].data;
  if (c[kBias].present) validated_[kBias] = c[kBias].data;

  std::string why;
  d_ = GetDriver(&why);
  if (!d_) throw OpError("the CUDA kernel cannot run: " + why);

  // A constructor that throws runs no destructor: hand back what was acquired so far.
  try {
    Ort::ThrowOnError(api.KernelInfoGetAllocator(info_ptr, OrtMemTypeDefault, &alloc_));
    mem_info_ = alloc_->Info(alloc_);
    const char* mem_name = nullptr;
    Ort::ThrowOnError(api.MemoryInfoGetName(mem_info_, &mem_name));
    if (!mem_name || std::strcmp(mem_name, "Cuda") != 0) {
      throw OpError(std::string("the CUDA kernel was given a '") + (mem_name ? mem_name : "?") +
                    "' allocator, not onnxruntime's CUDA device allocator");
    }
    Ort::ThrowOnError(api.MemoryInfoGetId(mem_info_, &device_id_));
    d_->Check(d_->DeviceGet(&dev_, device_id_), "cuDeviceGet");
    int major = 0, minor = 0;
    d_->Check(d_->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev_), "cuDeviceGetAttribute");
    d_->Check(d_->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev_), "cuDeviceGetAttribute");
    arch_ = SelectArch(major, minor, &why);
    if (!arch_) throw OpError(why + " (CUDA device " + std::to_string(device_id_) + ")");
    d_->Check(d_->DevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
    fns_ = std::make_unique<FunctionSet>(*d_, ctx_);

    ScopedContext scope(*d_, ctx_);
    if (validated_[kB] && validated_[kScales]) {
      const auto* B = static_cast<const uint8_t*>(c[kB].data);
      const auto* S = static_cast<const float*>(c[kScales].data);
      if (g_.fast) {
        const FastWeights w = RepackFast(L_, g_, B, S);
        const_addr_[kBufBp] = UploadConstant(w.Bp.data(), w.Bp.size());
        const_addr_[kBufSw] = UploadConstant(w.sw.data(), w.sw.size() * sizeof(float));
        const_addr_[kBufWs] = UploadConstant(w.ws.data(), w.ws.size() * sizeof(int32_t));
      } else {
        const_addr_[kBufB] = UploadConstant(B, static_cast<size_t>(L_.a.N * L_.b_row_bytes));
        const_addr_[kBufScales] = UploadConstant(S, static_cast<size_t>(L_.a.N * L_.n_wgroups) * sizeof(float));
      }
      weights_const_ = true;
    }
    if (validated_[kActPerm]) {
      const size_t es = c[kActPerm].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4;
      const_addr_[kBufActPerm] = UploadConstant(c[kActPerm].data, static_cast<size_t>(L_.a.K) * es);
    }
    if (validated_[kActScale]) {
      const_addr_[kBufActScale] = UploadConstant(c[kActScale].data, static_cast<size_t>(L_.a.K) * sizeof(float));
    }
    if (validated_[kBias]) {
      const_addr_[kBufBias] = UploadConstant(c[kBias].data, static_cast<size_t>(L_.a.N) * sizeof(float));
    }

    // Load every cubin this node can reach now, so that runs (and CUDA graph captures) only launch.
    for (const KernelEntry* e : ReachableEntries(L_, g_, spec_, arch_)) fns_->Get(e);
    if (Verbose()) {
      std::fprintf(stderr, "SerqMatMul CUDA: K=%lld N=%lld rank=%lld block=%lld bits_w=%lld: %s path, sm_%d cubins on device %d (cc %d.%d)\n",
                   static_cast<long long>(L_.a.K), static_cast<long long>(L_.a.N), static_cast<long long>(L_.a.rank),
                   static_cast<long long>(L_.block), static_cast<long long>(L_.a.bits_w), g_.fast ? "fast" : "generic",
                   arch_, device_id_, major, minor);
    }
  } catch (...) {
    Release();
    throw;
  }
}

SerqMatMulCudaKernel::~SerqMatMulCudaKernel() { Release(); }

void SerqMatMulCudaKernel::Release() noexcept {
  try {
    if (d_ && ctx_) {
      ScopedContext scope(*d_, ctx_);
      fns_.reset();
    }
  } catch (...) {
  }
  if (alloc_) {
    for (void* p : owned_) alloc_->Free(alloc_, p);
    owned_.clear();
    Ort::GetApi().ReleaseAllocator(alloc_);
    alloc_ = nullptr;
  }
  if (d_ && ctx_) d_->DevicePrimaryCtxRelease(dev_);
  ctx_ = nullptr;
}

CUdeviceptr SerqMatMulCudaKernel::UploadConstant(const void* host, size_t bytes) {
  void* p = alloc_->Alloc(alloc_, bytes ? bytes : 1);
  if (!p) throw OpError("onnxruntime's CUDA allocator could not provide " + std::to_string(bytes) + " bytes for the weights");
  owned_.push_back(p);
  const CUdeviceptr dst = reinterpret_cast<CUdeviceptr>(p);
  if (bytes) d_->Check(d_->MemcpyHtoD(dst, host, bytes), "cuMemcpyHtoD (weights)");
  return dst;
}

std::shared_ptr<const CallPlan> SerqMatMulCudaKernel::PlanFor(int64_t M, const NodeSpec& s) {
  const int flags = (s.has_perm ? 1 : 0) | (s.perm_i64 ? 2 : 0) | (s.has_scale ? 4 : 0) | (s.has_bias ? 8 : 0);
  const auto key = std::make_pair(M, flags);
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
  }
  auto plan = std::make_shared<const CallPlan>(MakePlan(L_, g_, s, M, arch_));
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (plans_.size() >= kMaxCachedPlans) plans_.clear();
  plans_[key] = plan;
  return plan;
}

void SerqMatMulCudaKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const size_t n_inputs = ctx.GetInputCount();
  TensorView in[kNumInputs];
  for (size_t i = 0; i < kNumInputs; ++i) in[i] = GetInput(ctx, n_inputs, i);
  if (!in[kA].present || !in[kB].present || !in[kScales].present || !in[kWsum].present) {
    throw OpError("inputs A, B, scales and wsum are required");
  }
  const int64_t M = CheckActivations(L_, in[kA]);
  const bool a_f16 = in[kA].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (a_f16 != (spec_.a == DType::kF16)) throw OpError("internal error: A's type differs from the kernel's");
  for (size_t i = kB; i < kNumInputs; ++i) CheckInputShape(L_, i, in[i]);
  NodeSpec s = spec_;
  s.has_scale = in[kActScale].present;
  s.has_perm = in[kActPerm].present;
  s.has_bias = in[kBias].present;
  if (s.has_perm && (in[kActPerm].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) != spec_.perm_i64) {
    throw OpError("internal error: act_perm's type differs from the kernel's");
  }

  // Constant initializers were validated and uploaded at creation and cannot change; inputs fed
  // at run time are checked (and uploaded below) on every call.
  const bool fed_weights = !weights_const_;
  if (fed_weights) {
    CheckScales(L_, static_cast<const float*>(in[kScales].data));
    CheckWsum(L_, static_cast<const uint8_t*>(in[kB].data), static_cast<const int32_t*>(in[kWsum].data));
  }
  const bool fed_perm = s.has_perm && !validated_[kActPerm];
  if (fed_perm) CheckPerm(in[kActPerm].data, spec_.perm_i64, L_.a.K);
  const bool fed_scale = s.has_scale && !validated_[kActScale];
  const bool fed_bias = s.has_bias && !validated_[kBias];

  std::vector<int64_t> out_shape(in[kA].shape.begin(), in[kA].shape.end() - 1);
  out_shape.push_back(L_.a.N);
  Ort::UnownedValue Y = ctx.GetOutput(0, out_shape);
  if (M == 0) return;

  const std::shared_ptr<const CallPlan> plan = PlanFor(M, s);
  const Tables& t = GetTables();

  // Scratch of the plan, and device room for inputs fed at run time, in one allocation.
  CallScratch scratch(context, mem_info_, kAlign, "CUDA scratch memory");
  size_t off[kMaxBufs] = {};
  bool in_scratch[kMaxBufs] = {};
  auto reserve = [&](int buf, size_t bytes) {
    off[buf] = scratch.Reserve(bytes);
    in_scratch[buf] = true;
  };
  for (size_t i = 0; i < t.n_scratch; ++i) {
    if (plan->scratch_count[i] > 0) {
      reserve(kNumFixedBufs + static_cast<int>(i), static_cast<size_t>(plan->scratch_count[i] * t.scratch[i].elem_size));
    }
  }
  // Host data of fed inputs, alive until the copies below are staged (pageable copies return
  // once the driver holds the data).
  FastWeights fw;
  struct HostCopy {
    int buf;
    const void* data;
    size_t bytes;
  };
  std::vector<HostCopy> copies;
  if (fed_weights) {
    const auto* B = static_cast<const uint8_t*>(in[kB].data);
    const auto* S = static_cast<const float*>(in[kScales].data);
    if (g_.fast) {
      fw = RepackFast(L_, g_, B, S);
      copies.push_back({kBufBp, fw.Bp.data(), fw.Bp.size()});
      copies.push_back({kBufSw, fw.sw.data(), fw.sw.size() * sizeof(float)});
      copies.push_back({kBufWs, fw.ws.data(), fw.ws.size() * sizeof(int32_t)});
    } else {
      copies.push_back({kBufB, B, static_cast<size_t>(L_.a.N * L_.b_row_bytes)});
      copies.push_back({kBufScales, S, static_cast<size_t>(L_.a.N * L_.n_wgroups) * sizeof(float)});
    }
  }
  if (fed_perm) copies.push_back({kBufActPerm, in[kActPerm].data, static_cast<size_t>(L_.a.K) * (spec_.perm_i64 ? 8 : 4)});
  if (fed_scale) copies.push_back({kBufActScale, in[kActScale].data, static_cast<size_t>(L_.a.K) * sizeof(float)});
  if (fed_bias) copies.push_back({kBufBias, in[kBias].data, static_cast<size_t>(L_.a.N) * sizeof(float)});
  for (const HostCopy& hc : copies) reserve(hc.buf, hc.bytes);

  ScopedContext scope(*d_, ctx_);
  const CUdeviceptr base = reinterpret_cast<CUdeviceptr>(scratch.Allocate());
  BufferAddresses bufs;
  for (int b = 0; b < kNumFixedBufs; ++b) bufs.addr[b] = const_addr_[b];
  if (!s.has_perm) bufs.addr[kBufActPerm] = 0;
  if (!s.has_scale) bufs.addr[kBufActScale] = 0;
  if (!s.has_bias) bufs.addr[kBufBias] = 0;
  for (int b = 0; b < kMaxBufs; ++b) {
    if (in_scratch[b]) bufs.addr[b] = base + off[b];
  }
  bufs.addr[kBufA] = reinterpret_cast<CUdeviceptr>(in[kA].data);
  bufs.addr[kBufY] = reinterpret_cast<CUdeviceptr>(Y.GetTensorMutableRawData());
  auto stream = static_cast<CUstream>(ctx.GetGPUComputeStream());
  for (const HostCopy& hc : copies) {
    d_->Check(d_->MemcpyHtoDAsync(bufs.addr[hc.buf], hc.data, hc.bytes, stream), "cuMemcpyHtoDAsync (fed weights)");
  }
  Launch(*d_, *fns_, *plan, bufs, stream);
}

OrtStatusPtr SerqMatMulCudaKernel::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Compute(context);
    return nullptr;
  } catch (...) {
    return StatusFromCurrentException("running the CUDA kernel");
  }
}

OrtStatusPtr CreateSerqMatMulCudaKernel(const OrtKernelInfo* info, void** op_kernel, DType a, bool perm_i64) noexcept {
  *op_kernel = nullptr;
  try {
    *op_kernel = new SerqMatMulCudaKernel(info, a, perm_i64);
    return nullptr;
  } catch (...) {
    return StatusNamingNode(info);
  }
}

}  // namespace cuda
}  // namespace serq
