// The aarch64 counterpart of include/isa.h: a wrapper defines QTOOL_ISA_NEON (baseline
// ARMv8-A Advanced SIMD, every aarch64 CPU) or QTOOL_ISA_NEONDOT (ARMv8.2-A dot product:
// vdotq_s32; Cortex-A55/A76 and later, Apple M1+, Neoverse) and includes a kernel family,
// which then compiles its NEON section into namespace `neon` or `neondot`. qtool.native.build
// generates those wrappers on aarch64; kernels/cpu/dispatch.cpp picks neondot where
// getauxval(AT_HWCAP) has HWCAP_ASIMDDP, else neon. tests/kernels/neon/build.sh builds the same
// sources without torch for the qemu tests.
#pragma once

#if !defined(__aarch64__)
#error "the NEON kernels are built for aarch64 only"
#endif

#include <arm_neon.h>

#if defined(QTOOL_ISA_NEONDOT)
#define QTOOL_ISA_NS neondot
#if !defined(QTOOL_ISA_NEON)
#define QTOOL_ISA_NEON 1
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#define QTOOL_ISA_END _Pragma("clang attribute pop")
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")  // "+dotprod" alone does not inline vdotq_s32 (GCC 12)
#define QTOOL_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define QTOOL_ISA_NS neon
#define QTOOL_ISA_END
#endif
