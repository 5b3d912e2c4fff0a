// The kernel table in use: picked once when the library loads (the best ISA this CPU runs, or
// the one QTOOL_KERNEL_ISA=avx512|avx2|scalar forces), switchable for tests.
#pragma once

#include <string>

#include "qtool_kernels.h"

namespace qtool {
namespace cpu {

const KernelTable& kernels();
// Switches to `name` ("avx512", "avx2", "scalar" or "auto"); returns an error message, empty
// on success.
std::string select_isa(const std::string& name);
// Names of the ISA builds this CPU can run, best first.
std::string supported_isas();

}  // namespace cpu
}  // namespace qtool
