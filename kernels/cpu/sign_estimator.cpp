// Binary sign with STE/ReSTE gradients for training: one pass forward, one pass backward.
//
// forward:  out = z >= 0 ? +1 : -1                       (sign(0) = +1, as the kernels/exporter)
// backward: grad_z = g * d(z), with (ReSTE, Wu et al. ICCV 2023)
//             d(z) = 0                                   |z| > t
//                    m^((1-o)/o)                         |z| < m   (secant slope f(m)/m)
//                    (1/o) |z|^((1-o)/o)                 otherwise
//           STE is the special case o = 1, t = 1 (d = 1 on |z| <= 1), which skips the power.
// Element-wise, so any memory layout works as long as z and g share it. The pure-PyTorch
// reference in qtool/quant/binary.py computes the same numbers; tests hold the two together.
// Built with -ffast-math so that exp/log in the power vectorize (glibc libmvec); nothing here
// depends on NaN/inf semantics, and -0 still binarizes to +1 (the comparison is z >= 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "target_clones.h"

namespace {

constexpr int64_t kGrain = 1 << 15;

QTOOL_CLONES
void sign_block(const float* z, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] >= 0.0f ? 1.0f : -1.0f;
}

QTOOL_CLONES
void clip_block(const float* z, const float* g, float* out, int64_t n, float t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = std::fabs(z[i]) <= t ? g[i] : 0.0f;
}

QTOOL_CLONES
void power_block(const float* z, const float* g, float* out, int64_t n, float exponent, float inv_o, float t,
                 float m, float plateau) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(z[i]);
    const float power = inv_o * std::exp(exponent * std::log(a < m ? m : a));
    const float d = a > t ? 0.0f : (a < m ? plateau : power);
    out[i] = g[i] * d;
  }
}

const float* float_data(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "sign_estimator: ", what, " must be float32");
  return x.data_ptr<float>();
}

}  // namespace

torch::Tensor sign_forward(torch::Tensor z) {
  TORCH_CHECK(z.is_non_overlapping_and_dense(), "sign_estimator: z must be dense");
  auto out = torch::empty_like(z);
  const float* zp = float_data(z, "z");
  float* op = out.data_ptr<float>();
  at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
    sign_block(zp + begin, op + begin, end - begin);
  });
  return out;
}

torch::Tensor sign_backward(torch::Tensor grad, torch::Tensor z, double o, double t, double m) {
  TORCH_CHECK(z.is_non_overlapping_and_dense(), "sign_estimator: z must be dense");
  TORCH_CHECK(o >= 1.0 && m > 0.0 && t > m, "sign_estimator: needs o >= 1 and 0 < m < t");
  if (grad.strides() != z.strides()) grad = torch::empty_like(z).copy_(grad);  // z's layout, element by element
  auto out = torch::empty_like(z);
  const float* zp = float_data(z, "z");
  const float* gp = float_data(grad, "grad");
  float* op = out.data_ptr<float>();
  const float exponent = static_cast<float>((1.0 - o) / o);
  const float plateau = static_cast<float>(std::pow(m, (1.0 - o) / o));
  at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (o == 1.0)
      clip_block(zp + begin, gp + begin, op + begin, end - begin, static_cast<float>(t));
    else
      power_block(zp + begin, gp + begin, op + begin, end - begin, exponent, static_cast<float>(1.0 / o),
                  static_cast<float>(t), static_cast<float>(m), plateau);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "binary sign, sign(0) = +1");
  m.def("sign_backward", &sign_backward, "ReSTE/STE gradient of the binary sign (o, t, m)");
}
