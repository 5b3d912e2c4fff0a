#!/bin/sh
# Builds the NEON test harness for aarch64: the kernel families (kernels/cpu/lowbit.cpp and
# binary.cpp) compiled three times (scalar reference, baseline NEON, NEON with the dot
# product), the runtime ISA dispatch, the layout/im2col helpers and harness.cpp, linked statically so that qemu-user
# runs it without a sysroot.
#   tests/kernels/neon/build.sh OUT_DIR [KERNELS_DIR]
# CXX_AARCH64 overrides the compiler (default aarch64-linux-gnu-g++; g++ on an aarch64 host).
# Then: qemu-aarch64 OUT_DIR/harness selftest   (or OUT_DIR/harness selftest on ARM).
set -eu
out=${1:?usage: build.sh OUT_DIR [KERNELS_DIR]}
here=$(cd "$(dirname "$0")" && pwd)
k=${2:-$here/../../../kernels}
cxx=${CXX_AARCH64:-aarch64-linux-gnu-g++}
mkdir -p "$out"
flags="-std=c++20 -O2 -Wall -Wno-unused-function -march=armv8-a -I$k/include -I$k/cpu"
objs=""
compile() {  # source, object name, extra flags
  $cxx $flags $3 -c "$1" -o "$out/$2.o"
  objs="$objs $out/$2.o"
}
for family in lowbit binary; do
  compile "$k/cpu/$family.cpp" "${family}_scalar" ""
  compile "$k/cpu/$family.cpp" "${family}_neon" "-DQTOOL_ISA_NEON=1"
  compile "$k/cpu/$family.cpp" "${family}_neondot" "-DQTOOL_ISA_NEONDOT=1"
done
compile "$k/cpu/dispatch.cpp" dispatch ""
compile "$k/cpu/layout.cpp" layout ""
compile "$k/cpu/im2col.cpp" im2col ""
compile "$here/harness.cpp" harness ""
$cxx -static -o "$out/harness" $objs
echo "$out/harness"
