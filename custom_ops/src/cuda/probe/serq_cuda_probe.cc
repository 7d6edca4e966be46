// Test probe of the CUDA kernel's host logic, built by tests/test_cuda_ep_host.py with g++ from
// the same sources as the library (plan, repack, launcher) and the tables generated from an AOT
// manifest. The driver is a recording stand-in, so everything up to cuLaunchKernel -- cubin
// choice, module loading, grid, parameter packing, scratch sizes -- runs as in the library and
// is printed as JSON.
//
//   serq_cuda_probe plan < cases      one line per case:
//       M K N rank group_w group_a bits_w bits_a fp32|fp16 none|i32|i64 has_scale has_bias cc_major cc_minor
//   serq_cuda_probe arch MAJOR MINOR
//   serq_cuda_probe dump DIR          every embedded cubin as DIR/sm_<arch>/<name>.cubin
//   serq_cuda_probe repack K N rank group_w group_a B.bin scales.bin OUT_PREFIX
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "cuda/launcher.h"
#include "cuda/plan.h"
#include "cuda/repack.h"

using namespace serq;
using namespace serq::cuda;

namespace {

struct FakeModule {
  const KernelEntry* entry;
};
struct FakeFunction {
  const KernelEntry* entry;
  std::string symbol;
  int max_dynamic_shared = 0;
};
std::vector<FakeModule*> g_modules;
std::vector<FakeFunction*> g_functions;
std::ostringstream g_launches;
int g_n_launches = 0;

const KernelEntry* EntryOfImage(const void* image) {
  const Tables& t = GetTables();
  for (size_t i = 0; i < t.n_entries; ++i) {
    if (t.entries[i].cubin == image) return &t.entries[i];
  }
  return nullptr;
}

CUresult FakeGetErrorString(CUresult, const char** s) {
  *s = "fake";
  return CUDA_SUCCESS;
}
CUresult FakeModuleLoadData(CUmodule* m, const void* image) {
  const KernelEntry* e = EntryOfImage(image);
  if (!e) return CUDA_ERROR_INVALID_IMAGE;  // only embedded images may be loaded
  g_modules.push_back(new FakeModule{e});
  *m = reinterpret_cast<CUmodule>(g_modules.back());
  return CUDA_SUCCESS;
}
CUresult FakeModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult FakeModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
  auto* mod = reinterpret_cast<FakeModule*>(m);
  if (std::strcmp(name, mod->entry->symbol) != 0) return CUDA_ERROR_NOT_FOUND;
  g_functions.push_back(new FakeFunction{mod->entry, name});
  *f = reinterpret_cast<CUfunction>(g_functions.back());
  return CUDA_SUCCESS;
}
CUresult FakeFuncSetAttribute(CUfunction f, CUfunction_attribute attr, int value) {
  if (attr == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) reinterpret_cast<FakeFunction*>(f)->max_dynamic_shared = value;
  return CUDA_SUCCESS;
}
CUresult FakeLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                          unsigned shared, CUstream stream, void** params, void** extra) {
  auto* fn = reinterpret_cast<FakeFunction*>(f);
  const KernelEntry* e = fn->entry;
  // What the real driver would refuse: more dynamic shared memory than the function allows.
  if (shared > 48 * 1024 && static_cast<int>(shared) > fn->max_dynamic_shared) return CUDA_ERROR_INVALID_VALUE;
  std::ostringstream& o = g_launches;
  if (g_n_launches++) o << ", ";
  o << "{\"name\": \"" << e->name << "\", \"arch\": " << e->arch << ", \"symbol\": \"" << fn->symbol
    << "\", \"cubin_size\": " << e->cubin_size << ", \"grid\": [" << gx << ", " << gy << ", " << gz << "], \"block\": ["
    << bx << ", " << by << ", " << bz << "], \"shared\": " << shared << ", \"stream\": " << reinterpret_cast<uintptr_t>(stream)
    << ", \"extra\": " << (extra ? 1 : 0) << ", \"params\": [";
  for (size_t i = 0; i < e->n_args; ++i) {
    if (i) o << ", ";
    if (e->args[i].type[0] == '*') {
      uint64_t v;
      std::memcpy(&v, params[i], 8);
      o << v;
    } else {
      int32_t v;
      std::memcpy(&v, params[i], 4);
      o << v;
    }
  }
  o << "]}";
  return CUDA_SUCCESS;
}

Driver FakeDriver() {
  Driver d;
  d.GetErrorString = FakeGetErrorString;
  d.ModuleLoadData = FakeModuleLoadData;
  d.ModuleUnload = FakeModuleUnload;
  d.ModuleGetFunction = FakeModuleGetFunction;
  d.FuncSetAttribute = FakeFuncSetAttribute;
  d.LaunchKernel = FakeLaunchKernel;
  return d;
}

std::string Json(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

SerqLayout LayoutOf(int64_t K, int64_t N, int64_t rank, int64_t gw, int64_t ga, int64_t bw, int64_t ba) {
  SerqAttrs a;
  a.K = K;
  a.N = N;
  a.rank = rank;
  a.group_w = gw;
  a.group_a = ga;
  a.bits_w = bw;
  a.bits_a = ba;
  return SerqLayout::FromAttrs(a);
}

int Plan() {
  const Driver d = FakeDriver();
  FunctionSet fns(d, reinterpret_cast<CUcontext>(0x1));
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    int64_t M, K, N, rank, gw, ga, bw, ba;
    std::string dtype, perm;
    int has_scale, has_bias, major, minor;
    in >> M >> K >> N >> rank >> gw >> ga >> bw >> ba >> dtype >> perm >> has_scale >> has_bias >> major >> minor;
    if (!in) {
      std::cerr << "bad case line: " << line << "\n";
      return 2;
    }
    g_launches.str("");
    g_n_launches = 0;
    std::ostringstream o;
    try {
      const SerqLayout L = LayoutOf(K, N, rank, gw, ga, bw, ba);
      const Geometry g = GeometryOf(L);
      NodeSpec s;
      s.a = dtype == "fp16" ? DType::kF16 : DType::kF32;
      s.has_perm = perm != "none";
      s.perm_i64 = perm == "i64";
      s.has_scale = has_scale != 0;
      s.has_bias = has_bias != 0;
      std::string why;
      const int arch = SelectArch(major, minor, &why);
      if (!arch) throw OpError(why);
      const CallPlan p = MakePlan(L, g, s, M, arch);
      const Tables& t = GetTables();
      // Addresses as the kernel assigns them: inputs anywhere 256-aligned, scratch packed.
      BufferAddresses bufs;
      for (int b = 0; b < kNumFixedBufs; ++b) bufs.addr[b] = (static_cast<CUdeviceptr>(b) + 1) << 32;
      if (!s.has_perm) bufs.addr[kBufActPerm] = 0;
      if (!s.has_scale) bufs.addr[kBufActScale] = 0;
      if (!s.has_bias) bufs.addr[kBufBias] = 0;
      CUdeviceptr next = CUdeviceptr{0x7f} << 40;
      o << "{\"arch\": " << arch << ", \"path\": \"" << (g.fast ? "fast" : "generic") << "\", \"gemm_class\": "
        << Json(p.gemm_class) << ", \"q\": {";
      const Quantities& q = p.q;
      o << "\"M\": " << q.M << ", \"KX\": " << q.KX << ", \"unit\": " << q.unit << ", \"n_units\": " << q.n_units
        << ", \"n_pairs\": " << q.n_pairs << ", \"n_groups\": " << q.n_groups << ", \"qmax\": " << q.qmax
        << ", \"off\": " << q.off << ", \"ldp\": " << q.ldp << ", \"n_split\": " << q.n_split
        << ", \"pairs_per_split\": " << q.pairs_per_split << "}, \"scratch\": {";
      for (size_t i = 0; i < t.n_scratch; ++i) {
        o << (i ? ", " : "") << Json(t.scratch[i].name) << ": " << p.scratch_count[i];
        if (p.scratch_count[i] > 0) {
          bufs.addr[kNumFixedBufs + i] = next;
          next += (static_cast<CUdeviceptr>(p.scratch_count[i] * t.scratch[i].elem_size) + 255) / 256 * 256;
        }
      }
      o << "}, \"buffers\": {";
      for (int b = 0; b < kNumFixedBufs + static_cast<int>(t.n_scratch); ++b) {
        o << (b ? ", " : "") << Json(BufferName(b)) << ": " << bufs.addr[b];
      }
      o << "}, \"steps\": [";
      for (size_t i = 0; i < p.steps.size(); ++i) {
        o << (i ? ", " : "") << "{\"step\": " << Json(p.steps[i].step->step) << ", \"variant\": " << Json(p.steps[i].entry->name)
          << ", \"args\": [";
        for (size_t a = 0; a < p.steps[i].args.size(); ++a) {
          const PlanValue& v = p.steps[i].args[a];
          o << (a ? ", " : "") << "[" << Json(p.steps[i].entry->args[a].name) << ", ";
          if (v.buf >= 0) {
            o << Json(BufferName(v.buf));
          } else {
            o << v.i;
          }
          o << "]";
        }
        o << "]}";
      }
      Launch(d, fns, p, bufs, reinterpret_cast<CUstream>(0x5eed));
      o << "], \"launches\": [" << g_launches.str() << "]}";
      std::cout << o.str() << "\n";
    } catch (const std::exception& e) {
      std::cout << "{\"error\": " << Json(e.what()) << "}\n";
    }
  }
  return 0;
}

int Arch(int major, int minor) {
  std::string why;
  const int a = SelectArch(major, minor, &why);
  std::cout << "{\"arch\": " << a << ", \"why\": " << Json(why) << "}\n";
  return 0;
}

int Dump(const std::string& dir) {
  const Tables& t = GetTables();
  ::mkdir(dir.c_str(), 0755);
  for (size_t i = 0; i < t.n_entries; ++i) {
    const KernelEntry& e = t.entries[i];
    const std::string sub = dir + "/sm_" + std::to_string(e.arch);
    ::mkdir(sub.c_str(), 0755);
    std::ofstream f(sub + "/" + e.name + ".cubin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(e.cubin), static_cast<std::streamsize>(e.cubin_size));
  }
  std::cout << "{\"entries\": " << t.n_entries << ", \"archs\": " << t.archs_json << "}\n";
  return 0;
}

template <typename T>
std::vector<T> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  const std::streamsize n = f.tellg();
  f.seekg(0);
  std::vector<T> v(static_cast<size_t>(n) / sizeof(T));
  f.read(reinterpret_cast<char*>(v.data()), n);
  return v;
}

template <typename T>
void WriteAll(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

int Repack(char** argv) {
  const SerqLayout L = LayoutOf(std::stoll(argv[0]), std::stoll(argv[1]), std::stoll(argv[2]), std::stoll(argv[3]),
                                std::stoll(argv[4]), 4, 8);
  const Geometry g = GeometryOf(L);
  const auto B = ReadAll<uint8_t>(argv[5]);
  const auto S = ReadAll<float>(argv[6]);
  if (static_cast<int64_t>(B.size()) != L.a.N * L.b_row_bytes || static_cast<int64_t>(S.size()) != L.a.N * L.n_wgroups) {
    std::cerr << "B or scales has the wrong size\n";
    return 2;
  }
  const FastWeights w = RepackFast(L, g, B.data(), S.data());
  const std::string prefix = argv[7];
  WriteAll(prefix + ".Bp", w.Bp);
  WriteAll(prefix + ".sw", w.sw);
  WriteAll(prefix + ".ws", w.ws);
  std::cout << "{\"KX\": " << g.KX << ", \"n_units\": " << g.n_units << "}\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "plan") return Plan();
    if (cmd == "arch" && argc == 4) return Arch(std::stoi(argv[2]), std::stoi(argv[3]));
    if (cmd == "dump" && argc == 3) return Dump(argv[2]);
    if (cmd == "repack" && argc == 10) return Repack(argv + 2);
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: serq_cuda_probe plan|arch MAJOR MINOR|dump DIR|repack K N rank group_w group_a B scales OUT\n";
  return 2;
}
