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
#include <type_traits>
#include <vector>

#include "call_scratch.h"
#include "op_common.h"
#include "quantize_act.h"
#include "weight_check.h"

namespace serq {

namespace {

inline float ToFloat(Ort::Float16_t v) { return v.ToFloat(); }

// Per-row activation quantization over row chunks.
template <typename T>
struct QuantizeJob {
  const SerqLayout* L;
  QuantSpanKernels kern;
  const T* A;
  const float* act_scale;  // nullable
  const int32_t* perm;     // nullable
  int64_t M;
  int64_t rows_per_task;
  float* xbuf;  // [tasks, K]
  uint8_t* codes;
  float* blk_scale;
  int32_t* blk_zero;
  int32_t* blk_corr;  // nullable
  bool centered;
  uint8_t* row_ok;

  static void Run(void* self, size_t task) {
    const auto& j = *static_cast<const QuantizeJob*>(self);
    const SerqLayout& L = *j.L;
    const int64_t K = L.a.K, nb = L.n_blocks;
    float* x = j.xbuf + static_cast<int64_t>(task) * K;
    const int64_t m0 = static_cast<int64_t>(task) * j.rows_per_task;
    const int64_t m1 = std::min(j.M, m0 + j.rows_per_task);
    for (int64_t m = m0; m < m1; ++m) {
      // X^[k] = A[perm[k]] * act_scale[k], in float32 as the reference computes it.
      if constexpr (std::is_same_v<T, float>) {
        j.kern.gather_scale(j.A + m * K, j.perm, j.act_scale, K, x);
      } else {
        const T* a = j.A + m * K;
        for (int64_t k = 0; k < K; ++k) {
          const float v = ToFloat(a[j.perm ? j.perm[k] : k]);
          x[k] = j.act_scale ? v * j.act_scale[k] : v;
        }
      }
      const QuantRowOut out{j.codes + m * L.K_ext, j.blk_scale + m * nb, j.blk_zero + m * nb,
                            j.blk_corr ? j.blk_corr + m * nb : nullptr, j.centered};
      j.row_ok[m] = QuantizeActRow(x, L, j.kern, out) ? 1 : 0;
    }
  }
};

struct GemmJob {
  GemmProblem prob;
  OutputSink out;
  GemmRegionFn run;
  int64_t M, N;
  int64_t rows_per_task, cols_per_task, col_tasks;

  static void Run(void* self, size_t task) {
    const auto& j = *static_cast<const GemmJob*>(self);
    const int64_t rt = static_cast<int64_t>(task) / j.col_tasks;
    const int64_t ct = static_cast<int64_t>(task) % j.col_tasks;
    const int64_t m0 = rt * j.rows_per_task, m1 = std::min(j.M, m0 + j.rows_per_task);
    const int64_t n0 = ct * j.cols_per_task, n1 = std::min(j.N, n0 + j.cols_per_task);
    j.run(j.prob, j.out, m0, m1, n0, n1);
  }
};

struct PackJob {
  const SerqLayout* L;
  const PanelLayout* P;
  const uint8_t* B;
  const float* scales;
  const int32_t* wsum;
  int64_t groups_per_task;
  uint8_t* out;

  static void Run(void* self, size_t task) {
    const auto& j = *static_cast<const PackJob*>(self);
    const int64_t g0 = static_cast<int64_t>(task) * j.groups_per_task;
    const int64_t g1 = std::min(j.P->n_groups, g0 + j.groups_per_task);
    PackPanels(*j.L, *j.P, j.B, j.scales, j.wsum, g0, g1, j.out);
  }
};

void ParallelRun(const Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t tasks, void* job) {
  if (tasks == 1) {
    fn(job, 0);
  } else {
    ctx.ParallelFor(fn, static_cast<size_t>(tasks), 0, job);
  }
}

template <typename T>
T* Piece(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

}  // namespace

SerqMatMulCpuKernel::SerqMatMulCpuKernel(const OrtKernelInfo* info_ptr) {
  Ort::ConstKernelInfo info{info_ptr};
  const SerqAttrs a = ReadAttrs(info);
  L_ = SerqLayout::FromAttrs(a);
  const Isa isa = DetectIsa();
  gemm_ = SelectGemmKernel(L_, isa);
  quant_ = GetQuantSpanKernels(isa);
  P_ = MakePanelLayout(L_, gemm_.panel_width, gemm_.panel_group, !gemm_.centered);
  cpu_memory_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

  // Weight inputs that are constant initializers are checked once, here: a bad model fails when
  // the session is created, and Compute skips the value checks for them.
  ConstantInputs c = CheckConstantInputs(info, L_);
  std::copy(std::begin(c.validated), std::end(c.validated), validated_);
  const_perm_.assign(c.perm.begin(), c.perm.end());
  // Constant weights are packed into the kernel's panel layout once.
  if (P_.width && validated_[kB] && validated_[kScales] && validated_[kWsum]) {
    panel_store_.resize(P_.total_bytes() + 64);
    uint8_t* store = panel_store_.data();
    store += (64 - reinterpret_cast<uintptr_t>(store) % 64) % 64;
    PackPanels(L_, P_, static_cast<const uint8_t*>(validated_[kB]), static_cast<const float*>(validated_[kScales]),
               static_cast<const int32_t*>(validated_[kWsum]), 0, P_.n_groups, store);
    panels_ = store;
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
  const bool fed_perm = act_perm.present && act_perm.data != validated_[kActPerm];
  std::vector<int64_t> perm64;
  if (fed_perm) perm64 = CheckPerm(act_perm.data, act_perm.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, K);

  std::vector<int64_t> out_shape(A.shape.begin(), A.shape.end() - 1);
  out_shape.push_back(N);
  Ort::UnownedValue Y = ctx.GetOutput(0, out_shape);
  if (M == 0) return;

  const auto* Bp = static_cast<const uint8_t*>(B.data);
  const auto* sp = static_cast<const float*>(scales.data);
  const auto* wp = static_cast<const int32_t*>(wsum.data);
  const bool use_packed = panels_ != nullptr && B.data == validated_[kB] && scales.data == validated_[kScales] &&
                          wsum.data == validated_[kWsum];
  const bool pack_now = P_.width && !use_packed;

  // Quantize each row once, in chunks that keep the float scratch bounded.
  const int64_t q_tasks_max = std::min<int64_t>(M, 64);
  const int64_t rows_per_qtask = CeilDiv(M, q_tasks_max);
  const int64_t q_tasks = CeilDiv(M, rows_per_qtask);
  const int64_t nb = L_.n_blocks;

  // All per-call memory comes from onnxruntime's allocator, in one piece.
  CallScratch scratch(context, cpu_memory_, 64, "CPU scratch memory");
  const size_t o_codes = scratch.Reserve(static_cast<size_t>((M + gemm_.pad_rows) * L_.K_ext));
  const size_t o_scale = scratch.Reserve(static_cast<size_t>(M * nb) * sizeof(float));
  const size_t o_zero = scratch.Reserve(static_cast<size_t>(M * nb) * sizeof(int32_t));
  const size_t o_corr = scratch.Reserve(gemm_.needs_corr ? static_cast<size_t>(M * nb) * sizeof(int32_t) : 0);
  const size_t o_ok = scratch.Reserve(static_cast<size_t>(M));
  const size_t o_x = scratch.Reserve(static_cast<size_t>(q_tasks * K) * sizeof(float));
  const size_t o_perm = scratch.Reserve(fed_perm ? static_cast<size_t>(K) * sizeof(int32_t) : 0);
  const size_t o_pc = scratch.Reserve(pack_now ? P_.total_bytes() : 0);
  uint8_t* base = scratch.Allocate();

  const int32_t* pp = nullptr;
  if (fed_perm) {
    int32_t* p32 = Piece<int32_t>(base, o_perm);
    for (int64_t k = 0; k < K; ++k) p32[k] = static_cast<int32_t>(perm64[k]);
    pp = p32;
  } else if (act_perm.present) {
    pp = const_perm_.data();
  }

  const uint8_t* panels = panels_;
  if (pack_now) {
    const int64_t per = std::max<int64_t>(1, CeilDiv(P_.n_groups, 16));
    PackJob pj{&L_, &P_, Bp, sp, wp, per, Piece<uint8_t>(base, o_pc)};
    ParallelRun(ctx, &PackJob::Run, CeilDiv(P_.n_groups, per), &pj);
    panels = Piece<uint8_t>(base, o_pc);
  }

  uint8_t* codes = Piece<uint8_t>(base, o_codes);
  float* blk_scale = Piece<float>(base, o_scale);
  int32_t* blk_zero = Piece<int32_t>(base, o_zero);
  int32_t* blk_corr = gemm_.needs_corr ? Piece<int32_t>(base, o_corr) : nullptr;
  uint8_t* row_ok = Piece<uint8_t>(base, o_ok);
  const float* asp = act_scale.present ? static_cast<const float*>(act_scale.data) : nullptr;
  const bool fp16 = A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (fp16) {
    QuantizeJob<Ort::Float16_t> qj{&L_, quant_, static_cast<const Ort::Float16_t*>(A.data), asp, pp, M,
                                   rows_per_qtask, Piece<float>(base, o_x), codes, blk_scale, blk_zero, blk_corr,
                                   gemm_.centered, row_ok};
    ParallelRun(ctx, &QuantizeJob<Ort::Float16_t>::Run, q_tasks, &qj);
  } else {
    QuantizeJob<float> qj{&L_, quant_, static_cast<const float*>(A.data), asp, pp, M, rows_per_qtask,
                          Piece<float>(base, o_x), codes, blk_scale, blk_zero, blk_corr, gemm_.centered, row_ok};
    ParallelRun(ctx, &QuantizeJob<float>::Run, q_tasks, &qj);
  }

  // Row chunks x column chunks (whole register tiles); one row (decode) is split over columns
  // only, into at least 32 tasks where the columns allow it.
  const int64_t unit = gemm_.tile_cols;
  const int64_t rows_per_task = std::min<int64_t>(M, gemm_.task_rows);
  const int64_t row_tasks = CeilDiv(M, rows_per_task);
  int64_t cols = CeilTo(64, unit);
  while (cols > unit && row_tasks * CeilDiv(N, cols) < 32) cols -= unit;
  const int64_t col_tasks = CeilDiv(N, cols);

  GemmJob gj{GemmProblem{&L_, ActRows{codes, blk_scale, blk_zero, blk_corr}, Bp, sp, wp, P_, panels},
             OutputSink{Y.GetTensorMutableRawData(), fp16, N,
                        bias.present ? static_cast<const float*>(bias.data) : nullptr, row_ok},
             gemm_.run, M, N, rows_per_task, cols, col_tasks};
  ParallelRun(ctx, &GemmJob::Run, row_tasks * col_tasks, &gj);
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
