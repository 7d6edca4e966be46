#include "serq_matmul_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "quantize_act.h"
#include "weight_check.h"

namespace serq {

namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "another type";
  }
}

bool Ok(OrtStatus* st) {
  if (!st) return true;
  Ort::GetApi().ReleaseStatus(st);
  return false;
}

// What an attribute of the wrong type holds, for the error message ("missing" if nothing).
std::string AttrKind(const Ort::ConstKernelInfo& info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  int64_t i = 0;
  float f = 0.0f;
  size_t n = 0;
  if (Ok(api.KernelInfoGetAttribute_int64(info, name, &i))) return "an integer";
  if (Ok(api.KernelInfoGetAttribute_float(info, name, &f))) return "a float";
  if (Ok(api.KernelInfoGetAttribute_string(info, name, nullptr, &n))) return "a string";
  if (Ok(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n))) return "a list of integers";
  if (Ok(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &n))) return "a list of floats";
  return "missing";
}

int64_t RequiredIntAttr(const Ort::ConstKernelInfo& info, const char* name) {
  int64_t v = 0;
  if (!Ok(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v))) {
    const std::string kind = AttrKind(info, name);
    throw OpError(std::string("missing or non-integer attribute '") + name + "' (" +
                  (kind == "missing" ? "missing" : "it is " + kind) + ")");
  }
  return v;
}

std::string OptionalStringAttr(const Ort::ConstKernelInfo& info, const char* name, const std::string& dflt) {
  size_t size = 0;
  if (!Ok(Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size))) {
    const std::string kind = AttrKind(info, name);
    if (kind != "missing") throw OpError(std::string("attribute '") + name + "' must be a string, it is " + kind);
    return dflt;
  }
  std::string out(size, '\0');
  Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttribute_string(info, name, &out[0], &size));
  out.resize(size ? size - 1 : 0);
  return out;
}

struct TensorView {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

TensorView ViewOf(const Ort::ConstValue& value, size_t index) {
  TensorView v;
  if (value == nullptr) return v;
  if (!value.IsTensor()) throw OpError("input " + std::to_string(index) + " is not a tensor");
  auto info = value.GetTensorTypeAndShapeInfo();
  v.present = true;
  v.type = info.GetElementType();
  v.shape = info.GetShape();
  v.data = value.GetTensorRawData();
  return v;
}

TensorView GetInput(const Ort::KernelContext& ctx, size_t n_inputs, size_t index) {
  if (index >= n_inputs) return TensorView{};
  return ViewOf(ctx.GetInput(index), index);
}

// The input's value when it is a constant initializer, else an absent view.
TensorView GetConstantInput(const Ort::ConstKernelInfo& info, size_t n_inputs, size_t index) {
  if (index >= n_inputs) return TensorView{};
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* st = Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return TensorView{};
  }
  if (!is_constant || !value) return TensorView{};
  return ViewOf(Ort::ConstValue{value}, index);
}

void CheckTensor(const TensorView& t, const char* name, ONNXTensorElementDataType type,
                 const std::vector<int64_t>& shape, const char* shape_desc) {
  if (t.type != type || t.shape != shape) {
    throw OpError(std::string(name) + " must be " + TypeName(type) + " " + shape_desc + " = " + ShapeStr(shape) +
                  ", got " + TypeName(t.type) + " " + ShapeStr(t.shape));
  }
}

enum InputIndex : size_t { kA = 0, kB, kScales, kWsum, kActScale, kActPerm, kBias, kNumInputs };

// Type and shape of input `index` (B .. bias), when present.
void CheckInputShape(const SerqLayout& L, size_t index, const TensorView& t) {
  if (!t.present) return;
  const int64_t K = L.a.K, N = L.a.N;
  switch (index) {
    case kB:
      CheckTensor(t, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {N, L.b_row_bytes},
                  L.a.bits_w == 4 ? "[N, K_ext / 2]" : "[N, K_ext]");
      break;
    case kScales:
      CheckTensor(t, "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N, L.n_wgroups}, "[N, K_ext / group_w]");
      break;
    case kWsum:
      CheckTensor(t, "wsum", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {N, L.n_blocks}, "[N, K_ext / block]");
      break;
    case kActScale:
      CheckTensor(t, "act_scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {K}, "[K]");
      break;
    case kActPerm:
      if (t.shape != std::vector<int64_t>{K} ||
          (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)) {
        throw OpError("act_perm must be int32 or int64 [K] = [" + std::to_string(K) + "], got " + TypeName(t.type) +
                      " " + ShapeStr(t.shape));
      }
      break;
    case kBias:
      CheckTensor(t, "bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N}, "[N]");
      break;
    default:
      break;
  }
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(Ort::Float16_t v) { return v.ToFloat(); }
template <typename T>
inline T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) { return v; }
template <>
inline Ort::Float16_t FromFloat<Ort::Float16_t>(float v) { return Ort::Float16_t(v); }

// Per-row activation quantization over row chunks.
template <typename T>
struct QuantizeJob {
  const SerqLayout* L;
  ActOrder order;
  QuantSpanKernels kern;
  const T* A;
  const float* act_scale;  // nullable
  const int64_t* perm;     // nullable
  int64_t M;
  int64_t rows_per_task;
  float* xbuf;        // [tasks, K]
  uint8_t* code_buf;  // [tasks, K_ext]
  uint8_t* codes;
  float* blk_scale;
  int32_t* blk_zero;
  int32_t* blk_corr;  // nullable
  uint8_t* row_ok;

  static void Run(void* self, size_t task) {
    const auto& j = *static_cast<const QuantizeJob*>(self);
    const SerqLayout& L = *j.L;
    const int64_t K = L.a.K;
    float* x = j.xbuf + static_cast<int64_t>(task) * K;
    uint8_t* scratch = j.code_buf + static_cast<int64_t>(task) * L.K_ext;
    const int64_t m0 = static_cast<int64_t>(task) * j.rows_per_task;
    const int64_t m1 = std::min(j.M, m0 + j.rows_per_task);
    for (int64_t m = m0; m < m1; ++m) {
      const T* a = j.A + m * K;
      // X^[j] = A[perm[j]] * act_scale[j], in float32 as the reference computes it.
      if (j.perm) {
        for (int64_t k = 0; k < K; ++k) x[k] = ToFloat(a[j.perm[k]]);
      } else {
        for (int64_t k = 0; k < K; ++k) x[k] = ToFloat(a[k]);
      }
      if (j.act_scale) {
        for (int64_t k = 0; k < K; ++k) x[k] = x[k] * j.act_scale[k];
      }
      const int64_t ip = ActParamIndex(m, 0, L.n_blocks);
      const QuantRowOut out{j.codes + m * L.K_ext, j.blk_scale + ip, j.blk_zero + ip,
                            j.blk_corr ? j.blk_corr + ip : nullptr, kTileRows};
      j.row_ok[m] = QuantizeActRow(x, L, j.order, j.kern, out, scratch) ? 1 : 0;
    }
  }
};

template <typename T>
struct GemmJob {
  GemmProblem prob;
  GemmTileFn tile;
  GemmRowFn row;  // nullable
  int64_t M, N;
  int64_t rows_per_task, cols_per_task, col_tasks;
  const uint8_t* row_ok;
  const float* bias;  // nullable
  T* Y;

  static void Run(void* self, size_t task) {
    const auto& j = *static_cast<const GemmJob*>(self);
    const int64_t rt = static_cast<int64_t>(task) / j.col_tasks;
    const int64_t ct = static_cast<int64_t>(task) % j.col_tasks;
    const int64_t m0 = rt * j.rows_per_task, m1 = std::min(j.M, m0 + j.rows_per_task);
    const int64_t n0 = ct * j.cols_per_task, n1 = std::min(j.N, n0 + j.cols_per_task);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (m1 - m0 == 1 && j.row) {
      // A single row (decode): wider column tiles keep all SIMD lanes busy.
      float acc[kRowCols];
      const bool ok = j.row_ok[m0] != 0;
      for (int64_t n = n0; n < n1; n += kRowCols) {
        const int nc = static_cast<int>(std::min<int64_t>(kRowCols, n1 - n));
        j.row(j.prob, m0, n, nc, acc);
        for (int c = 0; c < nc; ++c) {
          j.Y[m0 * j.N + n + c] = FromFloat<T>(ok ? (j.bias ? acc[c] + j.bias[n + c] : acc[c]) : nan);
        }
      }
      return;
    }
    float acc[kTileRows * kTileCols];
    // Row tiles must start at multiples of kTileRows (the activation parameter layout).
    for (int64_t n = n0; n < n1; n += kTileCols) {
      const int nc = static_cast<int>(std::min<int64_t>(kTileCols, n1 - n));
      for (int64_t m = m0; m < m1; m += kTileRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
        j.tile(j.prob, m, nr, n, nc, acc);
        for (int c = 0; c < nc; ++c) {
          const float bn = j.bias ? j.bias[n + c] : 0.0f;
          for (int r = 0; r < nr; ++r) {
            const float v = acc[c * kTileRows + r];
            j.Y[(m + r) * j.N + n + c] = FromFloat<T>(j.row_ok[m + r] ? (j.bias ? v + bn : v) : nan);
          }
        }
      }
    }
  }
};

template <typename T>
void RunTyped(const Ort::KernelContext& ctx, const SerqLayout& L, const GemmKernel& gemm,
              const QuantSpanKernels& quant, const T* A, int64_t M,
              const float* act_scale, const int64_t* perm, const uint8_t* B, const float* w_scales,
              const int32_t* wsum, const float* bias, T* Y) {
  const int64_t K = L.a.K, N = L.a.N;

  std::vector<uint8_t> codes(static_cast<size_t>(M * L.K_ext));
  // Block parameters in ActParamIndex layout; rows of the last tile past M stay 0.
  const int64_t m_tiles = CeilDiv(M, kTileRows);
  std::vector<float> blk_scale(static_cast<size_t>(m_tiles * kTileRows * L.n_blocks));
  std::vector<int32_t> blk_zero(static_cast<size_t>(m_tiles * kTileRows * L.n_blocks));
  std::vector<int32_t> blk_corr(gemm.needs_corr ? blk_zero.size() : 0);
  std::vector<uint8_t> row_ok(static_cast<size_t>(M));

  // Quantize each row once. Chunks keep the float scratch bounded.
  const int64_t q_tasks_max = std::min<int64_t>(M, 64);
  const int64_t rows_per_qtask = CeilDiv(M, q_tasks_max);
  const int64_t q_tasks = CeilDiv(M, rows_per_qtask);
  std::vector<float> xbuf(static_cast<size_t>(q_tasks * K));
  std::vector<uint8_t> code_buf(gemm.order == ActOrder::kNatural ? 0 : static_cast<size_t>(q_tasks * L.K_ext));
  QuantizeJob<T> qjob{&L,        gemm.order,   quant, A,           act_scale,       perm,
                      M,         rows_per_qtask, xbuf.data(), code_buf.data(), codes.data(),
                      blk_scale.data(), blk_zero.data(), gemm.needs_corr ? blk_corr.data() : nullptr,
                      row_ok.data()};
  if (q_tasks == 1) {
    QuantizeJob<T>::Run(&qjob, 0);
  } else {
    ctx.ParallelFor(&QuantizeJob<T>::Run, static_cast<size_t>(q_tasks), 0, &qjob);
  }

  // Row chunks x column tiles; small M (decode) is split over columns only.
  const int64_t rows_per_task = std::min<int64_t>(CeilTo(M, kTileRows), 8 * kTileRows);
  const int64_t row_tasks = CeilDiv(M, rows_per_task);
  int64_t cols = 64;
  while (cols > 8 && row_tasks * CeilDiv(N, cols) < 64) cols /= 2;
  const int64_t col_tasks = CeilDiv(N, cols);

  GemmJob<T> gjob{GemmProblem{&L, codes.data(), blk_scale.data(), blk_zero.data(),
                              gemm.needs_corr ? blk_corr.data() : nullptr, B, w_scales, wsum},
                  gemm.tile, gemm.row, M, N, rows_per_task, cols, col_tasks, row_ok.data(), bias, Y};
  const int64_t tasks = row_tasks * col_tasks;
  if (tasks == 1) {
    GemmJob<T>::Run(&gjob, 0);
  } else {
    ctx.ParallelFor(&GemmJob<T>::Run, static_cast<size_t>(tasks), 0, &gjob);
  }
}

}  // namespace

SerqMatMulCpuKernel::SerqMatMulCpuKernel(const OrtKernelInfo* info_ptr) {
  Ort::ConstKernelInfo info{info_ptr};
  SerqAttrs a;
  a.K = RequiredIntAttr(info, "K");
  a.N = RequiredIntAttr(info, "N");
  a.rank = RequiredIntAttr(info, "rank");
  a.group_w = RequiredIntAttr(info, "group_w");
  a.group_a = RequiredIntAttr(info, "group_a");
  a.bits_a = RequiredIntAttr(info, "bits_a");
  a.bits_w = RequiredIntAttr(info, "bits_w");
  a.scheme = OptionalStringAttr(info, "scheme", "int");
  L_ = SerqLayout::FromAttrs(a);
  const Isa isa = DetectIsa();
  gemm_ = SelectGemmKernel(L_, isa);
  quant_ = GetQuantSpanKernels(isa);

  // Weight inputs that are constant initializers are checked once, here: a bad model fails when
  // the session is created, and Compute skips the value checks for them.
  const size_t n_inputs = info.GetInputCount();
  if (n_inputs < kActScale) {
    throw OpError("inputs A, B, scales and wsum are required, the node has " + std::to_string(n_inputs) + " inputs");
  }
  TensorView c[kNumInputs];
  for (size_t i = kB; i < kNumInputs; ++i) {
    c[i] = GetConstantInput(info, n_inputs, i);
    CheckInputShape(L_, i, c[i]);
  }
  if (c[kScales].present) {
    CheckScales(L_, static_cast<const float*>(c[kScales].data));
    validated_[kScales] = c[kScales].data;
  }
  if (c[kB].present && c[kWsum].present) {
    CheckWsum(L_, static_cast<const uint8_t*>(c[kB].data), static_cast<const int32_t*>(c[kWsum].data));
    validated_[kB] = c[kB].data;
    validated_[kWsum] = c[kWsum].data;
  }
  if (c[kActPerm].present) {
    const_perm_ = CheckPerm(c[kActPerm].data, c[kActPerm].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, L_.a.K);
    validated_[kActPerm] = c[kActPerm].data;
  }
  if (const char* v = std::getenv("SERQ_ONNX_VERBOSE"); v && *v && std::strcmp(v, "0") != 0) {
    std::fprintf(stderr, "SerqMatMul: K=%lld N=%lld rank=%lld block=%lld bits_w=%lld bits_a=%lld: %s kernel\n",
                 static_cast<long long>(a.K), static_cast<long long>(a.N), static_cast<long long>(a.rank),
                 static_cast<long long>(L_.block), static_cast<long long>(a.bits_w),
                 static_cast<long long>(a.bits_a), IsaName(gemm_.isa));
  }
}

void SerqMatMulCpuKernel::Compute(OrtKernelContext* context) const {
  Ort::KernelContext ctx(context);
  const size_t n_inputs = ctx.GetInputCount();
  const int64_t K = L_.a.K, N = L_.a.N;
  auto s = [](int64_t v) { return std::to_string(v); };

  const TensorView A = GetInput(ctx, n_inputs, 0);
  const TensorView B = GetInput(ctx, n_inputs, 1);
  const TensorView scales = GetInput(ctx, n_inputs, 2);
  const TensorView wsum = GetInput(ctx, n_inputs, 3);
  const TensorView act_scale = GetInput(ctx, n_inputs, 4);
  const TensorView act_perm = GetInput(ctx, n_inputs, 5);
  const TensorView bias = GetInput(ctx, n_inputs, 6);
  if (!A.present || !B.present || !scales.present || !wsum.present) {
    throw OpError("inputs A, B, scales and wsum are required");
  }

  if (A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    throw OpError(std::string("A must be float32 or float16, got ") + TypeName(A.type));
  }
  if (A.shape.empty()) throw OpError("A must have at least one dimension (its last one is K=" + s(K) + ")");
  if (A.shape.back() != K) {
    throw OpError("A's last dimension is " + s(A.shape.back()) + " but attribute K is " + s(K));
  }
  // Rows: the product of the leading dimensions (0 if any is 0; onnxruntime's tensors fit in
  // memory, so a non-zero product cannot overflow).
  int64_t M = 1;
  for (size_t i = 0; i + 1 < A.shape.size(); ++i) {
    if (A.shape[i] == 0) {
      M = 0;
      break;
    }
  }
  for (size_t i = 0; M != 0 && i + 1 < A.shape.size(); ++i) M *= A.shape[i];

  const TensorView* views[kNumInputs] = {&A, &B, &scales, &wsum, &act_scale, &act_perm, &bias};
  for (size_t i = kB; i < kNumInputs; ++i) CheckInputShape(L_, i, *views[i]);
  // Value checks, unless the same constant data already passed them at kernel creation.
  if (scales.data != validated_[kScales]) CheckScales(L_, static_cast<const float*>(scales.data));
  if (B.data != validated_[kB] || wsum.data != validated_[kWsum]) {
    CheckWsum(L_, static_cast<const uint8_t*>(B.data), static_cast<const int32_t*>(wsum.data));
  }
  std::vector<int64_t> perm;
  const int64_t* pp = nullptr;
  if (act_perm.present) {
    if (act_perm.data == validated_[kActPerm]) {
      pp = const_perm_.data();
    } else {
      perm = CheckPerm(act_perm.data, act_perm.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, K);
      pp = perm.data();
    }
  }

  std::vector<int64_t> out_shape(A.shape.begin(), A.shape.end() - 1);
  out_shape.push_back(N);
  Ort::UnownedValue Y = ctx.GetOutput(0, out_shape);
  if (M == 0) return;

  const auto* Bp = static_cast<const uint8_t*>(B.data);
  const auto* sp = static_cast<const float*>(scales.data);
  const auto* wp = static_cast<const int32_t*>(wsum.data);
  const float* asp = act_scale.present ? static_cast<const float*>(act_scale.data) : nullptr;
  const float* bp = bias.present ? static_cast<const float*>(bias.data) : nullptr;
  if (A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    RunTyped<float>(ctx, L_, gemm_, quant_, static_cast<const float*>(A.data), M, asp, pp, Bp, sp, wp, bp,
                    Y.GetTensorMutableData<float>());
  } else {
    RunTyped<Ort::Float16_t>(ctx, L_, gemm_, quant_, static_cast<const Ort::Float16_t*>(A.data), M, asp, pp, Bp, sp, wp,
                             bp, Y.GetTensorMutableData<Ort::Float16_t>());
  }
}

OrtStatusPtr SerqMatMulCpuKernel::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Compute(context);
    return nullptr;
  } catch (...) {
    return StatusFromCurrentException("running the kernel");
  }
}

OrtStatusPtr StatusFromCurrentException(const char* context) noexcept {
  const OrtApi& api = Ort::GetApi();
  try {
    throw;
  } catch (const OpError& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), (std::string("SerqMatMul: ") + e.what()).c_str());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, (std::string("SerqMatMul: out of memory while ") + context).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (std::string("SerqMatMul: error while ") + context + ": " + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, (std::string("SerqMatMul: unknown error while ") + context).c_str());
  }
}

OrtStatusPtr CreateSerqMatMulCpuKernel(const OrtKernelInfo* info, void** op_kernel) noexcept {
  *op_kernel = nullptr;
  try {
    *op_kernel = new SerqMatMulCpuKernel(info);
    return nullptr;
  } catch (...) {
    // Name the node: a model holds one SerqMatMul per linear layer.
    OrtStatus* st = StatusFromCurrentException("creating the kernel");
    const OrtApi& api = Ort::GetApi();
    try {
      const std::string msg =
          std::string(api.GetErrorMessage(st)) + " (node '" + Ort::ConstKernelInfo{info}.GetNodeName() + "')";
      OrtStatus* named = api.CreateStatus(api.GetErrorCode(st), msg.c_str());
      api.ReleaseStatus(st);
      return named;
    } catch (...) {
      return st;
    }
  }
}

}  // namespace serq
