// CPU kernels of qtool::lsq_fake_quant and qtool::lsq_fake_quant_backward, the fused LSQ fake
// quantization of training: one pass forward, one pass backward.
//
// forward:  out = round(clamp(x / s, qmin, qmax)) * s              (round half to even)
// backward: grad_x = g where qmin <= x/s <= qmax, else 0
//           grad_s = factor * sum(g * (round(x/s) - x/s))  inside the range,
//                    factor * sum(g * qmin|qmax)            outside (LSQ, Esser et al. 2020)
// The scale is per tensor (size 1) or per output channel (dim 0, each channel one contiguous
// block: true for contiguous and channels-last tensors alike; other layouts are copied to
// contiguous first, see training_layout.h). float32 and float64. Schemas: registration.cpp;
// autograd, fake kernels and the pure-PyTorch reference, which gives the same numbers:
// qtool/quant/fake_quant.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "target_clones.h"
#include "training_layout.h"

namespace qtool {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 1 << 15;

// Round half to even, exactly like torch.round and nearbyint, for |v| below half the magic
// number: adding and subtracting 1.5 * 2^(mantissa bits) leaves no fraction bits, and the FPU's
// default rounding is half-even. Plain arithmetic, so the loops vectorize (a nearbyint call per
// element would not). Only used on clamped codes (|v| <= 255) or on values whose result is
// discarded.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}
inline double round_half_even(double v) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return (v + kMagic) - kMagic;
}

template <typename T>
QTOOL_CLONES void forward_block(const T* x, T* out, int64_t n, T s, T qmin, T qmax) {
  for (int64_t i = 0; i < n; ++i) {
    T v = x[i] / s;
    v = v < qmin ? qmin : v;
    v = v > qmax ? qmax : v;
    out[i] = round_half_even(v) * s;
  }
}

template <typename T>
QTOOL_CLONES double backward_block(const T* x, const T* g, T* gx, int64_t n, T s, T qmin, T qmax) {
  // Partial sums over blocks of 1024 in T, accumulated in double: accurate and vectorizable.
  double acc = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t stop = std::min(n, start + 1024);
    T partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < stop; ++i) {
      T v = x[i] / s;
      bool inside = v >= qmin && v <= qmax;
      T d = inside ? round_half_even(v) - v : (v < qmin ? qmin : qmax);
      gx[i] = inside ? g[i] : T(0);
      partial += g[i] * d;
    }
    acc += partial;
  }
  return acc;
}

void check(const Tensor& x, const Tensor& scale, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), op, ": scale must have x's dtype");
  TORCH_CHECK(scale.numel() == 1 || (x.dim() > 0 && scale.numel() == x.size(0)), op,
              ": scale must have 1 or x.size(0) elements");
}

Tensor lsq_fake_quant(const Tensor& x_in, const Tensor& scale, double qmin, double qmax,
                      double /* grad_factor: used by the backward only */) {
  check(x_in, scale, "lsq_fake_quant");
  const Tensor x = x_in.contiguous(training_layout(x_in));
  const Tensor s = scale.contiguous();
  Tensor out = at::empty_like(x);
  const int64_t channels = s.numel();
  const int64_t inner = channels == 1 ? x.numel() : x.numel() / channels;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_fake_quant", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t lo = static_cast<scalar_t>(qmin), hi = static_cast<scalar_t>(qmax);
    if (channels == 1) {
      at::parallel_for(0, inner, kGrain, [&](int64_t begin, int64_t end) {
        forward_block(xp + begin, op + begin, end - begin, sp[0], lo, hi);
      });
    } else {
      at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) forward_block(xp + c * inner, op + c * inner, inner, sp[c], lo, hi);
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> lsq_fake_quant_backward(const Tensor& grad_in, const Tensor& x_in, const Tensor& scale,
                                                   double qmin, double qmax, double grad_factor) {
  check(x_in, scale, "lsq_fake_quant_backward");
  const at::MemoryFormat layout = training_layout(x_in);
  const Tensor x = x_in.contiguous(layout);
  TORCH_CHECK(grad_in.scalar_type() == x.scalar_type(), "lsq_fake_quant_backward: grad must have x's dtype");
  const Tensor grad = grad_in.contiguous(layout);
  const Tensor s = scale.contiguous();
  Tensor grad_x = at::empty_like(x);
  Tensor grad_s = at::zeros(s.sizes(), s.options());
  const int64_t channels = s.numel();
  const int64_t inner = channels == 1 ? x.numel() : x.numel() / channels;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_fake_quant_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* gsp = grad_s.data_ptr<scalar_t>();
    const scalar_t lo = static_cast<scalar_t>(qmin), hi = static_cast<scalar_t>(qmax);
    if (channels == 1) {
      const int64_t chunks = std::max<int64_t>(1, (inner + kGrain - 1) / kGrain);
      std::vector<double> partial(chunks, 0.0);  // fixed chunks: the sum does not depend on thread count
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t first = k * kGrain, n = std::min(inner, first + kGrain) - first;
          partial[k] = backward_block(xp + first, gp + first, gxp + first, n, sp[0], lo, hi);
        }
      });
      double total = 0.0;
      for (double p : partial) total += p;
      gsp[0] = static_cast<scalar_t>(total * grad_factor);
    } else {
      at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          gsp[c] = static_cast<scalar_t>(
              backward_block(xp + c * inner, gp + c * inner, gxp + c * inner, inner, sp[c], lo, hi) * grad_factor);
      });
    }
  });
  return {grad_x, grad_s};
}

}  // namespace
}  // namespace qtool

TORCH_LIBRARY_IMPL(qtool, CPU, m) {
  m.impl("lsq_fake_quant", &qtool::lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &qtool::lsq_fake_quant_backward);
}
