// CPU kernels of qtool::reste_sign and qtool::reste_sign_backward: the binary sign with STE/ReSTE
// gradients for training, one pass forward, one pass backward.
//
// forward:  out = z >= 0 ? +1 : -1                       (sign(0) = +1, as the kernels/exporter)
// backward: grad_z = g * d(z), with (ReSTE, Wu et al. ICCV 2023)
//             d(z) = 0                                   |z| > t
//                    m^((1-o)/o)                         |z| < m   (secant slope f(m)/m)
//                    (1/o) |z|^((1-o)/o)                 otherwise
//           STE is the special case o = 1, t = 1 (d = 1 on |z| <= 1), which skips the power.
// Element-wise, in the layout of training_layout.h (channels-last stays, others turn contiguous).
// float32 and float64. Schemas: registration.cpp; autograd, fake kernels and the pure-PyTorch
// reference, which computes the same numbers: qtool/quant/sign_estimator.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "target_clones.h"
#include "training_layout.h"

#if defined(__x86_64__) && defined(__GLIBC__)
// glibc declares its vector exp/log (libmvec, which the build links) only under -ffast-math, and
// the library is not built with it (the magic-number rounding of fake_quant.cpp needs IEEE
// arithmetic). Declared here, they let ReSTE's power loop vectorize (15x faster than scalar calls).
#pragma omp declare simd notinbranch
extern "C" float expf(float);
#pragma omp declare simd notinbranch
extern "C" float logf(float);
#pragma omp declare simd notinbranch
extern "C" double exp(double);
#pragma omp declare simd notinbranch
extern "C" double log(double);
#endif

namespace qtool {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 1 << 15;

inline float exp_of(float v) { return ::expf(v); }
inline double exp_of(double v) { return ::exp(v); }
inline float log_of(float v) { return ::logf(v); }
inline double log_of(double v) { return ::log(v); }

template <typename T>
QTOOL_CLONES void sign_block(const T* z, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] >= T(0) ? T(1) : T(-1);
}

template <typename T>
QTOOL_CLONES void clip_block(const T* z, const T* g, T* out, int64_t n, T t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = std::fabs(z[i]) <= t ? g[i] : T(0);
}

template <typename T>
QTOOL_CLONES void power_block(const T* z, const T* g, T* out, int64_t n, T exponent, T inv_o, T t, T m, T plateau) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T a = std::fabs(z[i]);
    const T power = inv_o * exp_of(exponent * log_of(a < m ? m : a));
    const T d = a > t ? T(0) : (a < m ? plateau : power);
    out[i] = g[i] * d;
  }
}

Tensor laid_out(const Tensor& z, const char* op) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": z must be float32 or float64 on the CPU, got ", z.scalar_type());
  return z.contiguous(training_layout(z));
}

Tensor reste_sign(const Tensor& z_in, double /* o */, double /* t */, double /* m: the backward's */) {
  const Tensor z = laid_out(z_in, "reste_sign");
  Tensor out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "reste_sign", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      sign_block(zp + begin, op + begin, end - begin);
    });
  });
  return out;
}

Tensor reste_sign_backward(const Tensor& grad_in, const Tensor& z_in, double o, double t, double m) {
  TORCH_CHECK(o >= 1.0 && m > 0.0 && t > m, "reste_sign_backward: needs o >= 1 and 0 < m < t");
  const Tensor z = laid_out(z_in, "reste_sign_backward");
  TORCH_CHECK(grad_in.scalar_type() == z.scalar_type(), "reste_sign_backward: grad must have z's dtype");
  const Tensor grad = grad_in.strides() == z.strides() ? grad_in : at::empty_like(z).copy_(grad_in);  // z's layout
  Tensor out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "reste_sign_backward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto exponent = static_cast<scalar_t>((1.0 - o) / o);
    const auto plateau = static_cast<scalar_t>(std::pow(m, (1.0 - o) / o));
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      if (o == 1.0)
        clip_block(zp + begin, gp + begin, op + begin, end - begin, static_cast<scalar_t>(t));
      else
        power_block(zp + begin, gp + begin, op + begin, end - begin, exponent, static_cast<scalar_t>(1.0 / o),
                    static_cast<scalar_t>(t), static_cast<scalar_t>(m), plateau);
    });
  });
  return out;
}

}  // namespace
}  // namespace qtool

TORCH_LIBRARY_IMPL(qtool, CPU, m) {
  m.impl("reste_sign", &qtool::reste_sign);
  m.impl("reste_sign_backward", &qtool::reste_sign_backward);
}
