#include "serq_matmul_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "op_common.h"
#include "quantize_act.h"
#include "weight_check.h"

namespace serq {

namespace {

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
  const SerqAttrs a = ReadAttrs(info);
  L_ = SerqLayout::FromAttrs(a);
  const Isa isa = DetectIsa();
  gemm_ = SelectGemmKernel(L_, isa);
  quant_ = GetQuantSpanKernels(isa);

  // Weight inputs that are constant initializers are checked once, here: a bad model fails when
  // the session is created, and Compute skips the value checks for them.
  ConstantInputs c = CheckConstantInputs(info, L_);
  std::copy(std::begin(c.validated), std::end(c.validated), validated_);
  const_perm_ = std::move(c.perm);
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

  const int64_t M = CheckActivations(L_, A);

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

OrtStatusPtr CreateSerqMatMulCpuKernel(const OrtKernelInfo* info, void** op_kernel) noexcept {
  *op_kernel = nullptr;
  try {
    *op_kernel = new SerqMatMulCpuKernel(info);
    return nullptr;
  } catch (...) {
    return StatusNamingNode(info);
  }
}

}  // namespace serq
