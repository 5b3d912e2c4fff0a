// Fused LSQ fake quantization for training: one pass forward, one pass backward.
//
// forward:  out = round(clamp(x / s, qmin, qmax)) * s              (round half to even)
// backward: grad_x = g where qmin <= x/s <= qmax, else 0
//           grad_s = factor * sum(g * (round(x/s) - x/s))  inside the range,
//                    factor * sum(g * qmin|qmax)            outside (LSQ, Esser et al. 2020)
// The scale is per tensor (size 1) or per output channel (dim 0, each channel one contiguous
// block: true for contiguous and channels-last weights alike). The pure-PyTorch reference in
// qtool/quant/fake_quant.py computes the same numbers; tests hold the two together.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

#include "target_clones.h"

namespace {

constexpr int64_t kGrain = 1 << 15;

// Round half to even, exactly like torch.round and nearbyint, for |v| < 2^22: adding and
// subtracting 1.5 * 2^23 leaves no fraction bits, and the FPU's default rounding is half-even.
// Plain arithmetic, so the loops vectorize (a nearbyint call per element would not).
// Only used on clamped codes (|v| <= 255) or on values whose result is discarded.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

QTOOL_CLONES
void forward_block(const float* x, float* out, int64_t n, float s, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / s;
    v = v < qmin ? qmin : v;
    v = v > qmax ? qmax : v;
    out[i] = round_half_even(v) * s;
  }
}

QTOOL_CLONES
double backward_block(const float* x, const float* g, float* gx, int64_t n, float s, float qmin, float qmax) {
  // Float partial sums over blocks of 1024, accumulated in double: accurate and vectorizable.
  double acc = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t stop = std::min(n, start + 1024);
    float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < stop; ++i) {
      float v = x[i] / s;
      bool inside = v >= qmin && v <= qmax;
      float d = inside ? round_half_even(v) - v : (v < qmin ? qmin : qmax);
      gx[i] = inside ? g[i] : 0.0f;
      partial += g[i] * d;
    }
    acc += partial;
  }
  return acc;
}

// Channel c owns elements [c * inner, (c + 1) * inner); per-tensor is one channel.
void check(const torch::Tensor& x, const torch::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "fake_quant: x must be float32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat, "fake_quant: scale must be float32");
  TORCH_CHECK(scale.numel() == 1 || (x.dim() > 0 && scale.numel() == x.size(0)),
              "fake_quant: scale must have 1 or x.size(0) elements");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fake_quant: x must be contiguous or channels-last");
}

}  // namespace

torch::Tensor lsq_forward(torch::Tensor x, torch::Tensor scale, double qmin, double qmax) {
  check(x, scale);
  auto s = scale.contiguous();
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t channels = s.numel();
  const int64_t inner = channels == 1 ? x.numel() : x.numel() / channels;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  if (channels == 1) {
    at::parallel_for(0, inner, kGrain, [&](int64_t begin, int64_t end) {
      forward_block(xp + begin, op + begin, end - begin, sp[0], lo, hi);
    });
  } else {
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        forward_block(xp + c * inner, op + c * inner, inner, sp[c], lo, hi);
    });
  }
  return out;
}

std::vector<torch::Tensor> lsq_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor scale,
                                        double qmin, double qmax, double factor) {
  check(x, scale);
  auto s = scale.contiguous();
  grad = grad.contiguous(x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  auto grad_x = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t channels = s.numel();
  const int64_t inner = channels == 1 ? x.numel() : x.numel() / channels;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  auto grad_s = torch::zeros({channels}, x.options());
  float* gsp = grad_s.data_ptr<float>();
  if (channels == 1) {
    const int64_t chunks = std::max<int64_t>(1, (inner + kGrain - 1) / kGrain);
    std::vector<double> partial(chunks, 0.0);  // fixed chunks: the sum does not depend on thread count
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t lo_i = k * kGrain, n = std::min(inner, lo_i + kGrain) - lo_i;
        partial[k] = backward_block(xp + lo_i, gp + lo_i, gxp + lo_i, n, sp[0], lo, hi);
      }
    });
    double total = 0.0;
    for (double p : partial) total += p;
    gsp[0] = static_cast<float>(total * factor);
  } else {
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        gsp[c] = static_cast<float>(
            backward_block(xp + c * inner, gp + c * inner, gxp + c * inner, inner, sp[c], lo, hi) * factor);
    });
  }
  return {grad_x, grad_s};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_forward", &lsq_forward, "LSQ fake quantization, forward");
  m.def("lsq_backward", &lsq_backward, "LSQ fake quantization, backward (grad_x, grad_scale)");
}
