// Schemas of the qtool operators. Implementations: cpu/ops_cpu.cpp (CPU) and
// cuda/ops_cuda.cu (CUDA); fake (meta) implementations: qtool/lowbit/ops.py, which also holds
// a copy of these strings for the pure-PyTorch fallback (a test keeps the two equal).
#include <torch/library.h>

TORCH_LIBRARY(qtool, m) {
  m.def("pack_int4(Tensor codes) -> Tensor");
  m.def("unpack_int4(Tensor packed, int K) -> Tensor");
  m.def("pack_int3(Tensor codes) -> Tensor");
  m.def("unpack_int3(Tensor packed, int K) -> Tensor");
  m.def("pack_binary(Tensor x) -> Tensor");
  m.def("unpack_binary(Tensor bits, int K) -> Tensor");
  m.def("quantize_rows_i8(Tensor x) -> (Tensor, Tensor)");
  m.def("lowbit_gemm(Tensor x, Tensor w, Tensor scale, int bits, int K, int group_size) -> Tensor");
  m.def("lowbit_gemm_i8(Tensor xq, Tensor x_scale, Tensor w, Tensor scale, int bits, int K, int group_size) -> Tensor");
  m.def("binary_gemm(Tensor a, Tensor w, int K, Tensor? scale=None) -> Tensor");
  m.def("binary_conv2d(Tensor x, Tensor w, int in_channels, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, Tensor? scale=None) -> Tensor");
}
