// Instruction sets the CPU kernels are specialised for, detected at run time.
#pragma once

namespace serq {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

const char* IsaName(Isa isa);

// Best instruction set this CPU supports, capped by $SERQ_ONNX_ISA (scalar | avx2 | avx512vnni)
// when that is set (to exercise the fallbacks).
Isa DetectIsa();

// Whether the CPU (and OS) support `isa`; false for x86 sets on other architectures.
bool X86CpuSupports(Isa isa);

}  // namespace serq
