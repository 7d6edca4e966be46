// Per-function target attributes for the x86 kernels: each translation unit is built for the
// baseline ISA and the AVX2 / AVX512-VNNI / AMX functions are chosen at run time (isa.h).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SERQ_HAVE_X86_KERNELS 1
#include <immintrin.h>
#define SERQ_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SERQ_TARGET_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define SERQ_TARGET_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define SERQ_TARGET_AMX __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#endif
