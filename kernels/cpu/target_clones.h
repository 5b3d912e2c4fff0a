// QTOOL_CLONES: compile a function for AVX-512, AVX2 and baseline x86-64 and pick one at load
// time (GCC function multi-versioning), so one JIT build runs fast on any x86 CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QTOOL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QTOOL_CLONES
#endif
