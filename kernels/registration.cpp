// Schemas of every qtool operator, the low-bit ops and the training ops alike: one library.
// CPU kernels: cpu/ops_cpu.cpp (low-bit), cpu/fake_quant.cpp and cpu/sign_estimator.cpp
// (training); CUDA kernels: cuda/ops_cuda.cpp (low-bit, arithmetic in cuda/kernels.cu). Each op
// family's Python module (qtool/lowbit/ops.py, qtool/quant/fake_quant.py,
// qtool/quant/sign_estimator.py) registers the fake kernels, the autograd formulas and the
// pure-PyTorch reference, and holds a copy of its schemas for when this library cannot be
// loaded (a test keeps the copies equal to these strings).
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
  // binary_conv2d and what follows it in BNN blocks, in one pass over the output (ops_cpu.cpp;
  // reference: qtool/lowbit/reference.py): bias, ReLU, BN's affine, a residual add, ReLU.
  m.def("binary_conv2d_fused(Tensor x, Tensor w, int in_channels, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, Tensor? scale, Tensor? bias, bool relu_first, Tensor? post_scale, Tensor? post_shift, Tensor? residual, bool relu_last) -> Tensor");
  // Fused integer layers of a graph-prepared model (cpu/fused_layer.cpp; reference, fake kernels:
  // qtool/lowbit/fused_reference.py): input codes -> GEMM -> bias, unit (or the requantization
  // multiplier), clamp, requantization, optional residual add -> the next quantizer's codes (or
  // float32 when out_step == 0).
  m.def("fused_conv2d(Tensor x, Tensor w, Tensor bias, Tensor unit, Tensor? multiplier, int bits, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, float[] clamp, float out_step, int[] out_range, Tensor? residual, float residual_step, float[] add_clamp, float add_step, int[] add_range, bool residual_first=False) -> Tensor");
  m.def("fused_linear(Tensor x, Tensor w, Tensor bias, Tensor unit, Tensor? multiplier, int bits, float[] clamp, float out_step, int[] out_range, Tensor? residual, float residual_step, float[] add_clamp, float add_step, int[] add_range, bool residual_first=False) -> Tensor");
  // Training ops: the forward takes every input its backward needs (register_autograd sees only
  // the forward's inputs), hence grad_factor and o, t, m, which the forward itself ignores.
  m.def("lsq_fake_quant(Tensor x, Tensor scale, float qmin, float qmax, float grad_factor) -> Tensor");
  m.def("lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, float qmin, float qmax, float grad_factor) -> (Tensor, Tensor)");
  m.def("reste_sign(Tensor z, float o, float t, float m) -> Tensor");
  m.def("reste_sign_backward(Tensor grad, Tensor z, float o, float t, float m) -> Tensor");
}
