// Selects the instruction set of the translation unit that includes it. The build compiles
// each kernel family (binary.cpp, lowbit.cpp) once per ISA through a generated wrapper that
// defines QTOOL_ISA_AVX512, QTOOL_ISA_AVX2 or nothing (scalar), then includes the family.
// Standard headers must be included before this file: functions they define then keep the
// baseline target, so an AVX-512 copy of, say, an inline std helper can never be picked by
// the linker for the scalar build.
#pragma once

// The target list is spelled out in each pragma: GCC does not expand macros inside them.
#if defined(QTOOL_ISA_AVX512)
#define QTOOL_ISA_NS avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vpopcntdq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vpopcntdq")
#endif
#include <immintrin.h>
#elif defined(QTOOL_ISA_AVX2)
#define QTOOL_ISA_NS avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,bmi,bmi2,popcnt")
#endif
#include <immintrin.h>
#else
#define QTOOL_ISA_NS scalar
#define QTOOL_ISA_SCALAR 1
#endif

// Ends the ISA region; the last line of every kernel family file.
#if defined(QTOOL_ISA_AVX512) || defined(QTOOL_ISA_AVX2)
#if defined(__clang__)
#define QTOOL_ISA_END _Pragma("clang attribute pop")
#else
#define QTOOL_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define QTOOL_ISA_END
#endif
