#include "cuda/plan.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

namespace serq {
namespace cuda {

namespace {

std::string Str(int64_t v) { return std::to_string(v); }

const char* DTypeTag(DType t) { return t == DType::kF16 ? "fp16" : "fp32"; }

// Substitutes {tag} fields of a variant-name template.
std::string FormatVariant(const char* tmpl, const std::vector<std::pair<std::string, std::string>>& tags) {
  std::string out;
  for (const char* p = tmpl; *p; ++p) {
    if (*p != '{') {
      out += *p;
      continue;
    }
    const char* end = std::strchr(p, '}');
    if (!end) throw OpError(std::string("internal error: bad variant template ") + tmpl);
    const std::string key(p + 1, end);
    auto it = std::find_if(tags.begin(), tags.end(), [&](const auto& kv) { return kv.first == key; });
    if (it == tags.end()) throw OpError("internal error: variant template " + std::string(tmpl) + " names " + key);
    out += it->second;
    p = end;
  }
  return out;
}

bool IsPointer(const char* type) { return type[0] == '*'; }

using Tags = std::vector<std::pair<std::string, std::string>>;

// kernels/launch.py serq_matmul(): the tags of the variant-name templates.
Tags TagsFor(const SerqLayout& L, const Geometry& g, const NodeSpec& s, bool split, const std::string& gemm_class) {
  return {
      {"a_dtype", DTypeTag(s.a)},
      {"y_dtype", DTypeTag(s.a)},
      {"perm_dtype", s.has_perm && s.perm_i64 ? "i64" : "i32"},
      {"part_dtype", split ? "fp32" : DTypeTag(s.a)},
      {"gemm_class", gemm_class},
      {"quant_ch", Str(GetTables().quant_chunk(L.group_a_eff))},
      {"unit", Str(g.unit)},
      {"bits_w", Str(L.a.bits_w)},
  };
}

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

}  // namespace

Geometry GeometryOf(const SerqLayout& L) {
  const Tables& t = GetTables();
  Geometry g;
  const FastUnit* fu = nullptr;
  if (L.a.bits_w == 4) {
    for (size_t i = 0; i < t.n_fast_units && !fu; ++i) {
      if (L.block % t.fast_units[i].unit == 0) fu = &t.fast_units[i];
    }
  }
  g.fast = fu != nullptr;
  g.unit = g.fast ? fu->unit : L.block;
  g.half = g.fast ? fu->half : 0;
  g.units_per_pair = g.fast ? fu->units_per_pair : 0;
  const int64_t pair = 2 * g.half;
  g.KX = g.fast ? CeilTo(L.K_ext, pair) : L.K_ext;
  g.n_units = g.KX / g.unit;
  g.n_pairs = g.fast ? g.KX / pair : 0;
  g.n_groups = CeilDiv(L.a.K, L.group_a_eff);
  g.off = L.a.bits_a == 8 ? 128 : 0;
  g.qmax = (int64_t{1} << L.a.bits_a) - 1;
  return g;
}

Quantities QuantitiesFor(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int64_t M,
                         std::string* gemm_class) {
  const Tables& t = GetTables();
  Quantities q;
  q.M = M;
  q.N = L.a.N;
  q.K = L.a.K;
  q.rank = L.a.rank;
  q.K_pad = L.K_pad;
  q.r_pad = L.r_pad;
  q.K_ext = L.K_ext;
  q.group_w = L.a.group_w;
  q.block = L.block;
  q.bits_w = L.a.bits_w;
  q.KX = g.KX;
  q.unit = g.unit;
  q.n_units = g.n_units;
  q.n_pairs = g.n_pairs;
  q.group_a_eff = L.group_a_eff;
  q.n_groups = g.n_groups;
  q.qmax = g.qmax;
  q.off = g.off;
  q.ldp = std::max<int64_t>(16, CeilTo(M, 16));
  q.has_perm = s.has_perm;
  q.has_scale = s.has_scale;
  q.has_bias = s.has_bias;
  q.n_split = 1;
  q.pairs_per_split = std::max<int64_t>(g.n_pairs, 1);
  gemm_class->clear();
  if (g.fast) {
    // kernels/configs.py gemm_config() and split_k().
    const GemmClass* cfg = &t.gemm_classes[t.n_gemm_classes - 1];
    for (size_t i = 0; i < t.n_gemm_classes; ++i) {
      if (t.gemm_classes[i].m_max && M <= t.gemm_classes[i].m_max) {
        cfg = &t.gemm_classes[i];
        break;
      }
    }
    const int64_t tiles = std::max<int64_t>(1, CeilDiv(M, cfg->BM) * CeilDiv(q.N, cfg->BN));
    const int64_t want = CeilDiv(t.split_target_programs, tiles);
    const int64_t n = std::max<int64_t>(
        1, std::min<int64_t>({cfg->max_split, want, g.n_pairs / t.min_pairs_per_split}));
    const int64_t per = g.n_pairs ? CeilDiv(g.n_pairs, n) : 1;
    q.n_split = g.n_pairs ? CeilDiv(g.n_pairs, per) : 1;
    q.pairs_per_split = per;
    *gemm_class = cfg->name;
  }
  return q;
}

const char* BufferName(int buf) {
  static const char* const kNames[] = {"A", "act_perm", "act_scale", "bias", "Y", "Bp", "sw", "ws", "B", "scales"};
  if (buf >= 0 && buf < kNumFixedBufs) return kNames[buf];
  const Tables& t = GetTables();
  const size_t i = static_cast<size_t>(buf - kNumFixedBufs);
  return i < t.n_scratch ? t.scratch[i].name : "?";
}

const char* BufferType(int buf, const SerqLayout& L, const NodeSpec& s) {
  switch (buf) {
    case kBufA:
    case kBufY: return s.a == DType::kF16 ? "*fp16" : "*fp32";
    case kBufActPerm: return s.perm_i64 ? "*i64" : "*i32";
    case kBufActScale:
    case kBufBias:
    case kBufSw:
    case kBufScales: return "*fp32";
    case kBufBp: return "*i8";
    case kBufWs: return "*i32";
    case kBufB: return L.a.bits_w == 4 ? "*u8" : "*i8";
    default: break;
  }
  const Tables& t = GetTables();
  const size_t i = static_cast<size_t>(buf - kNumFixedBufs);
  return i < t.n_scratch ? t.scratch[i].type : "?";
}

const KernelEntry* FindEntry(const std::string& name, int arch) {
  const Tables& t = GetTables();
  for (size_t i = 0; i < t.n_entries; ++i) {
    if (t.entries[i].arch == arch && name == t.entries[i].name) return &t.entries[i];
  }
  return nullptr;
}

std::vector<const KernelEntry*> ReachableEntries(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int arch) {
  const Tables& t = GetTables();
  const char* path = g.fast ? "fast" : "generic";
  std::vector<const KernelEntry*> out;
  const size_t n_classes = g.fast ? t.n_gemm_classes : 1;
  for (size_t c = 0; c < n_classes; ++c) {
    for (bool split : {false, true}) {
      const Tags tags = TagsFor(L, g, s, split, g.fast ? t.gemm_classes[c].name : "");
      for (size_t si = 0; si < t.n_steps; ++si) {
        if (std::strcmp(t.steps[si].path, path) != 0) continue;
        const KernelEntry* e = FindEntry(FormatVariant(t.steps[si].variant, tags), arch);
        if (e && std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
      }
    }
  }
  return out;
}

int SelectArch(int major, int minor, std::string* why) {
  const Tables& t = GetTables();
  std::set<int> archs;
  int best = 0;
  for (size_t i = 0; i < t.n_entries; ++i) {
    const KernelEntry& e = t.entries[i];
    archs.insert(e.arch);
    const int amaj = e.arch / 10, amin = e.arch % 10;
    const size_t n = std::strlen(e.ptx_target);
    // sm_XYa code (wgmma on sm_90a) runs on exactly X.Y; plain sm_XY on X.Y and later minors.
    const bool exact_only = n && e.ptx_target[n - 1] == 'a';
    const bool ok = amaj == major && (exact_only ? amin == minor : amin <= minor);
    if (ok) best = std::max(best, e.arch);
  }
  if (!best && why) {
    std::string have;
    for (int a : archs) have += (have.empty() ? "sm_" : ", sm_") + Str(a);
    *why = "no cubin of this library runs on compute capability " + Str(major) + "." + Str(minor) +
           " (it has " + (have.empty() ? "none" : have) + "; sm_80 serves 8.x, sm_89 8.9, sm_90a 9.0 only)";
  }
  return best;
}

CallPlan MakePlan(const SerqLayout& L, const Geometry& g, const NodeSpec& s, int64_t M, int arch) {
  const Tables& t = GetTables();
  CallPlan p;
  p.q = QuantitiesFor(L, g, s, M, &p.gemm_class);
  const Quantities& q = p.q;
  bool err = false;

  // The kernels index with 32-bit integers in places; refuse what could wrap rather than read
  // out of bounds.
  const int64_t sizes[] = {M * L.a.K, M * L.a.N, M * g.KX, g.n_units * q.ldp, L.a.N * g.KX};
  for (int64_t v : sizes) {
    if (v > kInt32Max) {
      throw OpError("M=" + Str(M) + " rows of K=" + Str(L.a.K) + ", N=" + Str(L.a.N) +
                    " are too many for the CUDA kernels (a buffer would exceed 2^31 elements)");
    }
  }
  p.scratch_count.resize(t.n_scratch);
  for (size_t i = 0; i < t.n_scratch; ++i) {
    const int64_t c = t.scratch[i].count(q, &err);
    if (c < 0 || c > kInt32Max) {
      throw OpError(std::string("scratch buffer ") + t.scratch[i].name + " of " + Str(c) +
                    " elements is out of range for the CUDA kernels");
    }
    p.scratch_count[i] = c;
  }

  const Tags tags = TagsFor(L, g, s, q.n_split > 1, p.gemm_class);
  const char* path = g.fast ? "fast" : "generic";
  for (size_t si = 0; si < t.n_steps; ++si) {
    const StepSpec& st = t.steps[si];
    if (std::strcmp(st.path, path) != 0) continue;
    if (!st.when(q, &err)) continue;
    const std::string name = FormatVariant(st.variant, tags);
    const KernelEntry* e = FindEntry(name, arch);
    if (!e) throw OpError("the library has no cubin " + name + " for sm_" + Str(arch));
    if (e->kernel != st.kernel || e->n_args != st.n_args) {
      throw OpError("internal error: cubin " + name + " does not match step " + st.step);
    }
    StepPlan sp;
    sp.step = &st;
    sp.entry = e;
    const KernelFn& kf = t.kernels[st.kernel];
    for (int ax = 0; ax < 3; ++ax) {
      const int64_t v = kf.grid[ax](q, e->cx, &err);
      const int64_t lim = ax == 0 ? kInt32Max : 65535;
      if (v < 1 || v > lim) {
        throw OpError("launch grid of " + name + " would be " + Str(v) + " on axis " + Str(ax) +
                      " (allowed 1.." + Str(lim) + ") for M=" + Str(M));
      }
      sp.grid[ax] = v;
    }
    sp.args.resize(st.n_args);
    for (size_t ai = 0; ai < st.n_args; ++ai) {
      const ArgSpec& a = e->args[ai];
      const PlanValue v = st.args[ai](q, &err);
      if (IsPointer(a.type)) {
        if (v.buf >= 0) {
          if (std::strcmp(BufferType(v.buf, L, s), a.type) != 0) {
            throw OpError(std::string("internal error: ") + name + " parameter " + a.name + " is " + a.type +
                          " but buffer " + BufferName(v.buf) + " is " + BufferType(v.buf, L, s));
          }
        } else if (v.i != 0) {
          throw OpError(std::string("internal error: ") + name + " pointer parameter " + a.name + " is a number");
        }
      } else {
        if (v.buf >= 0) {
          throw OpError(std::string("internal error: ") + name + " parameter " + a.name + " is a buffer");
        }
        if (v.i < std::numeric_limits<int32_t>::min() || v.i > kInt32Max) {
          throw OpError(std::string("argument ") + a.name + " = " + Str(v.i) + " of " + name +
                        " does not fit in 32 bits (M=" + Str(M) + ")");
        }
        if (a.aligned16 && v.i % 16 != 0) {
          throw OpError(std::string("internal error: ") + name + " needs " + a.name + " divisible by 16, got " +
                        Str(v.i));
        }
      }
      sp.args[ai] = v;
    }
    p.steps.push_back(std::move(sp));
  }
  if (err) throw OpError("internal error: division by zero in the launch plan for M=" + Str(M));
  return p;
}

}  // namespace cuda
}  // namespace serq
