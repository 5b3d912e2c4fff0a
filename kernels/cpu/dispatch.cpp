// Runtime ISA dispatch: one function table per ISA build, chosen by CPU features.
#include "dispatch.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#define QTOOL_DECLARE_ISA(NS)                                                                   \
  namespace qtool {                                                                             \
  namespace cpu {                                                                               \
  namespace NS {                                                                                \
  void pack_sign_rows(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t);             \
  void pack_sign_planes(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t);           \
  void binary_tile(const BinaryTileArgs&);                                                      \
  bool binary_wants_nibbles();                                                                  \
  void binary_rows(const uint64_t*, int64_t, const uint64_t*, int64_t, int64_t, int64_t, int64_t,    \
                   const float*, int64_t, float*, int64_t);                                         \
  void quantize_rows_i8(const float*, int64_t, int64_t, int64_t, int8_t*, int64_t, float*);     \
  int lowbit_lanes();                                                                           \
  void lowbit_lane_sums(const LowbitArgs&, int64_t, int64_t);                                   \
  void lowbit_i8(const LowbitArgs&, int64_t, int64_t);                                          \
  void lowbit_f32(const LowbitArgs&, int64_t, int64_t);                                         \
  }                                                                                             \
  }                                                                                             \
  }

#define QTOOL_TABLE(NS)                                                                          \
  KernelTable {                                                                                  \
    #NS, &NS::pack_sign_rows, &NS::pack_sign_planes, &NS::binary_tile, NS::binary_wants_nibbles(), &NS::binary_rows, \
        &NS::quantize_rows_i8, NS::lowbit_lanes(),       \
        &NS::lowbit_lane_sums, &NS::lowbit_i8, &NS::lowbit_f32                                   \
  }

QTOOL_DECLARE_ISA(scalar)
#if defined(QTOOL_WITH_X86)
QTOOL_DECLARE_ISA(avx2)
QTOOL_DECLARE_ISA(avx512)
#elif defined(__aarch64__)
QTOOL_DECLARE_ISA(neon)
QTOOL_DECLARE_ISA(neondot)
#endif

namespace qtool {
namespace cpu {
namespace {

const KernelTable kScalar = QTOOL_TABLE(scalar);
#if defined(QTOOL_WITH_X86)
const KernelTable kAvx2 = QTOOL_TABLE(avx2);
const KernelTable kAvx512 = QTOOL_TABLE(avx512);

// AVX-512 here means the Ice Lake / Zen 4 feature set: VNNI for int8, VPOPCNTDQ for binary.
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vpopcntdq");
}

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
#elif defined(__aarch64__)
// Advanced SIMD is part of every aarch64 CPU; the ARMv8.2 dot product (SDOT/UDOT) is not.
const KernelTable kNeon = QTOOL_TABLE(neon);
const KernelTable kNeonDot = QTOOL_TABLE(neondot);

bool has_dotprod() {
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
  return false;  // no portable query here: the baseline NEON build is safe everywhere
#endif
}
#endif

// Supported builds, best first.
std::vector<const KernelTable*> available() {
  std::vector<const KernelTable*> out;
#if defined(QTOOL_WITH_X86)
  if (has_avx512()) out.push_back(&kAvx512);
  if (has_avx2()) out.push_back(&kAvx2);
#elif defined(__aarch64__)
  if (has_dotprod()) out.push_back(&kNeonDot);
  out.push_back(&kNeon);
#endif
  out.push_back(&kScalar);
  return out;
}

std::atomic<const KernelTable*> current{nullptr};

const KernelTable* from_environment() {
  const char* forced = std::getenv("QTOOL_KERNEL_ISA");
  const auto tables = available();
  if (forced && *forced) {
    const std::string name(forced);
    for (const KernelTable* t : tables)
      if (name == t->name) return t;
    if (name != "auto")
      std::fprintf(stderr, "qtool kernels: QTOOL_KERNEL_ISA=%s is not available on this CPU (%s); using %s\n",
                   forced, supported_isas().c_str(), tables.front()->name);
  }
  return tables.front();
}

// Chosen when the library loads.
const bool initialised = (current.store(from_environment()), true);

}  // namespace

const KernelTable& kernels() { return *current.load(std::memory_order_relaxed); }

std::string supported_isas() {
  std::string out;
  for (const KernelTable* t : available()) out += (out.empty() ? "" : ",") + std::string(t->name);
  return out;
}

std::string select_isa(const std::string& name) {
  const auto tables = available();
  if (name == "auto") {
    current.store(tables.front());
    return "";
  }
  for (const KernelTable* t : tables)
    if (name == t->name) {
      current.store(t);
      return "";
    }
  return "ISA '" + name + "' is not available on this CPU (available: " + supported_isas() + ")";
}

}  // namespace cpu
}  // namespace qtool
