// CUDA implementations of the qtool operators: the same checks as the CPU ones (op_checks.h),
// outputs allocated here, arithmetic in the kernels of kernels.cu (simple and exact: one warp
// or thread per output, not tuned). Work goes to the current stream of the input's device.
// Compiled by the host compiler in CUDA builds; nvcc only sees the torch-free kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "op_checks.h"

namespace qtool {
namespace {

using at::Tensor;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

Tensor pack_codes(const Tensor& codes, int bits) {
  checks::codes(codes, bits);
  const c10::cuda::CUDAGuard guard(codes.device());
  const Tensor c = codes.to(at::kChar).contiguous();
  const int64_t N = c.size(0), K = c.size(1), row_bytes = ceil_div(K, kBlock) * block_bytes(bits);
  Tensor out = at::empty({N, row_bytes}, c.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::pack_codes(c.data_ptr<int8_t>(), bits, N, K, row_bytes, out.data_ptr<uint8_t>(), stream()));
  return out;
}

Tensor unpack_codes(const Tensor& packed, int64_t K, int bits) {
  checks::packed(packed, bits, K, bits == 4 ? "unpack_int4" : "unpack_int3");
  const c10::cuda::CUDAGuard guard(packed.device());
  const Tensor p = packed.contiguous();
  Tensor out = at::empty({p.size(0), K}, p.options().dtype(at::kChar));
  C10_CUDA_CHECK(cuda::unpack_codes(p.data_ptr<uint8_t>(), bits, p.size(0), K, p.size(1), out.data_ptr<int8_t>(),
                                    stream()));
  return out;
}

Tensor pack_int4(const Tensor& codes) { return pack_codes(codes, 4); }
Tensor pack_int3(const Tensor& codes) { return pack_codes(codes, 3); }
Tensor unpack_int4(const Tensor& packed, int64_t K) { return unpack_codes(packed, K, 4); }
Tensor unpack_int3(const Tensor& packed, int64_t K) { return unpack_codes(packed, K, 3); }

Tensor pack_binary(const Tensor& x) {
  checks::float_rows(x, "pack_binary");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xf = x.to(at::kFloat).contiguous();
  Tensor out = at::empty({xf.size(0), ceil_div(xf.size(1), 64)}, xf.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::pack_binary(xf.data_ptr<float>(), xf.size(0), xf.size(1), out.data_ptr<int64_t>(), stream()));
  return out;
}

Tensor unpack_binary(const Tensor& bits, int64_t K) {
  checks::bits(bits, K, "unpack_binary", "bits");
  const c10::cuda::CUDAGuard guard(bits.device());
  const Tensor b = bits.contiguous();
  Tensor out = at::empty({b.size(0), K}, b.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::unpack_binary(b.data_ptr<int64_t>(), b.size(0), K, out.data_ptr<float>(), stream()));
  return out;
}

std::tuple<Tensor, Tensor> quantize_rows_i8(const Tensor& x) {
  checks::float_rows(x, "quantize_rows_i8");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xf = x.to(at::kFloat).contiguous();
  Tensor q = at::empty(xf.sizes(), xf.options().dtype(at::kChar));
  Tensor s = at::empty({xf.size(0)}, xf.options());
  C10_CUDA_CHECK(cuda::quantize_rows_i8(xf.data_ptr<float>(), xf.size(0), xf.size(1), q.data_ptr<int8_t>(),
                                        s.data_ptr<float>(), stream()));
  return {q, s};
}

cuda::LowbitDims lowbit_dims(const checks::LowbitShape& shape, int64_t M, int64_t K, int64_t group_size, int64_t bits,
                             const Tensor& w) {
  // One group spans the whole row, whatever group_size said.
  return {M, shape.N, K, shape.G, shape.G == 1 ? std::max<int64_t>(K, 1) : group_size, w.size(1),
          static_cast<int>(bits)};
}

Tensor lowbit_gemm(const Tensor& x, const Tensor& w, const Tensor& scale, int64_t bits, int64_t K, int64_t group_size) {
  checks::lowbit_x(x, w, K);
  const checks::LowbitShape shape = checks::lowbit(w, scale, bits, K, group_size, "lowbit_gemm");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({xc.size(0), shape.N}, xc.options());
  C10_CUDA_CHECK(cuda::lowbit_f32(xc.data_ptr<float>(), w.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                  lowbit_dims(shape, xc.size(0), K, group_size, bits, w), out.data_ptr<float>(),
                                  stream()));
  return out;
}

Tensor lowbit_gemm_i8(const Tensor& xq, const Tensor& x_scale, const Tensor& w, const Tensor& scale, int64_t bits,
                      int64_t K, int64_t group_size) {
  checks::lowbit_xq(xq, x_scale, w, K);
  const checks::LowbitShape shape = checks::lowbit(w, scale, bits, K, group_size, "lowbit_gemm_i8");
  const c10::cuda::CUDAGuard guard(xq.device());
  const Tensor xc = xq.contiguous(), xs = x_scale.contiguous();
  Tensor out = at::empty({xc.size(0), shape.N}, xs.options());
  C10_CUDA_CHECK(cuda::lowbit_i8(xc.data_ptr<int8_t>(), xs.data_ptr<float>(), w.data_ptr<uint8_t>(),
                                 scale.data_ptr<float>(), lowbit_dims(shape, xc.size(0), K, group_size, bits, w),
                                 out.data_ptr<float>(), stream()));
  return out;
}

Tensor binary_gemm(const Tensor& a, const Tensor& w, int64_t K, const std::optional<Tensor>& scale) {
  checks::bits(a, K, "binary_gemm", "a");
  checks::bits(w, K, "binary_gemm", "w");
  TORCH_CHECK(a.device() == w.device(), "binary_gemm: a and w must be on the same device");
  const int64_t scale_stride = checks::scale(scale, w.size(0), "binary_gemm");
  const c10::cuda::CUDAGuard guard(a.device());
  const Tensor ac = a.contiguous(), wc = w.contiguous();
  Tensor out = at::empty({ac.size(0), wc.size(0)}, ac.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::binary_gemm(ac.data_ptr<int64_t>(), wc.data_ptr<int64_t>(), ac.size(0), wc.size(0), K,
                                   scale.has_value() ? scale->data_ptr<float>() : nullptr, scale_stride,
                                   out.data_ptr<float>(), stream()));
  return out;
}

Tensor binary_conv2d(const Tensor& x, const Tensor& w, int64_t in_channels, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     const std::optional<Tensor>& scale) {
  const ConvGeometry g = checks::conv(x, w, in_channels, kernel_size, stride, padding, dilation);
  const int64_t scale_stride = checks::scale(scale, g.O, "binary_conv2d");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({g.N, g.O, g.OH, g.OW},
                         x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  const Tensor xc = x.to(at::kFloat).contiguous(), wc = w.contiguous();
  Tensor pixels = at::empty({g.N * g.H * g.W, g.Cw}, x.options().dtype(at::kLong));
  const cuda::ConvDims d{g.N, g.C, g.H, g.W, g.O, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.OH, g.OW, g.Kw, g.Cw};
  C10_CUDA_CHECK(cuda::binary_conv2d(xc.data_ptr<float>(), pixels.data_ptr<int64_t>(), wc.data_ptr<int64_t>(), d,
                                     scale.has_value() ? scale->data_ptr<float>() : nullptr, scale_stride,
                                     out.data_ptr<float>(), stream()));
  return out;
}

}  // namespace
}  // namespace qtool

TORCH_LIBRARY_IMPL(qtool, CUDA, m) {
  QTOOL_IMPL_ALL_OPS(m);
}
