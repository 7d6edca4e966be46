#include "op_common.h"

#include <new>

#include "weight_check.h"

namespace serq {

namespace {

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


void CheckTensor(const TensorView& t, const char* name, ONNXTensorElementDataType type,
                 const std::vector<int64_t>& shape, const char* shape_desc) {
  if (t.type != type || t.shape != shape) {
    throw OpError(std::string(name) + " must be " + TypeName(type) + " " + shape_desc + " = " + ShapeStr(shape) +
                  ", got " + TypeName(t.type) + " " + ShapeStr(t.shape));
  }
}


}  // namespace

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

SerqAttrs ReadAttrs(const Ort::ConstKernelInfo& info) {
  SerqAttrs a;
  a.K = RequiredIntAttr(info, "K");
  a.N = RequiredIntAttr(info, "N");
  a.rank = RequiredIntAttr(info, "rank");
  a.group_w = RequiredIntAttr(info, "group_w");
  a.group_a = RequiredIntAttr(info, "group_a");
  a.bits_a = RequiredIntAttr(info, "bits_a");
  a.bits_w = RequiredIntAttr(info, "bits_w");
  a.scheme = OptionalStringAttr(info, "scheme", "int");
  return a;
}

int64_t CheckActivations(const SerqLayout& L, const TensorView& A) {
  const int64_t K = L.a.K;
  auto s = [](int64_t v) { return std::to_string(v); };
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
  return M;
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

OrtStatusPtr StatusNamingNode(const OrtKernelInfo* info) noexcept {
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

ConstantInputs CheckConstantInputs(const Ort::ConstKernelInfo& info, const SerqLayout& L) {
  const size_t n_inputs = info.GetInputCount();
  if (n_inputs < kActScale) {
    throw OpError("inputs A, B, scales and wsum are required, the node has " + std::to_string(n_inputs) +
                  " inputs");
  }
  ConstantInputs out;
  TensorView* c = out.view;
  for (size_t i = kB; i < kNumInputs; ++i) {
    c[i] = GetConstantInput(info, n_inputs, i);
    CheckInputShape(L, i, c[i]);
  }
  if (c[kScales].present) {
    CheckScales(L, static_cast<const float*>(c[kScales].data));
    out.validated[kScales] = c[kScales].data;
  }
  if (c[kB].present && c[kWsum].present) {
    CheckWsum(L, static_cast<const uint8_t*>(c[kB].data), static_cast<const int32_t*>(c[kWsum].data));
    out.validated[kB] = c[kB].data;
    out.validated[kWsum] = c[kWsum].data;
  }
  if (c[kActPerm].present) {
    out.perm = CheckPerm(c[kActPerm].data, c[kActPerm].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, L.a.K);
    out.validated[kActPerm] = c[kActPerm].data;
  }
  return out;
}

}  // namespace serq
