// Instruction sets the CPU kernels are specialised for, detected at run time.
#pragma once

namespace serq {

// Ordered: a higher set can run every lower one's kernels.
// kAmx: AMX-INT8 tiles for prefill, the AVX512-VNNI kernels for the few-row (decode) calls.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };

const char* IsaName(Isa isa);

// Best instruction set this CPU supports, capped by $SERQ_ONNX_ISA (scalar | avx2 | avxvnni |
// avx512vnni | amx) when that is set (to exercise the fallbacks).
Isa DetectIsa();

// Whether the CPU (and OS: AMX needs the kernel's permission, asked for once) support `isa`;
// false for x86 sets on other architectures.
bool X86CpuSupports(Isa isa);

}  // namespace serq
