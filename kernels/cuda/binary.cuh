// CUDA binary kernels: XNOR-popcount GEMM (one warp per output, lanes over words) and a direct
// binary convolution that skips padded taps, so zero padding needs no correction.
#pragma once

#include <cstdint>

#include "launch.h"

namespace qtool {
namespace cuda {

__device__ __forceinline__ uint64_t low_bits(int64_t n) { return n >= 64 ? ~0ULL : (1ULL << n) - 1; }

__global__ void binary_gemm_kernel(const int64_t* a, const int64_t* w, int64_t M, int64_t N, int64_t K,
                                   const float* scale, int64_t scale_stride, float* out) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= M * N) return;
  const int64_t m = warp / N, n = warp % N, Kw = (K + 63) / 64;
  long long pc = 0;
  for (int64_t k = lane; k < Kw; k += 32) {
    const uint64_t x = static_cast<uint64_t>(a[m * Kw + k] ^ w[n * Kw + k]) & low_bits(K - 64 * k);
    pc += __popcll(x);
  }
  for (int o = 16; o > 0; o /= 2) pc += __shfl_down_sync(0xffffffffu, pc, o);
  if (lane == 0) out[m * N + n] = static_cast<float>(K - 2 * pc) * (scale ? scale[n * scale_stride] : 1.0f);
}

// Sign bits of each input pixel's channels, [N * H * W][Cw], from an NCHW float tensor.
__global__ void pack_pixels_kernel(const float* x, int64_t N, int64_t C, int64_t HW, int64_t Cw, int64_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * HW * Cw) return;
  const int64_t pixel = i / Cw, word = i % Cw, n = pixel / HW, p = pixel % HW;
  uint64_t bits = 0;
  for (int j = 0; j < 64 && word * 64 + j < C; ++j) bits |= uint64_t(x[(n * C + word * 64 + j) * HW + p] >= 0.0f) << j;
  out[i] = static_cast<int64_t>(bits);
}

// `count` (<= 64) bits of a packed row starting at bit `pos`.
__device__ __forceinline__ uint64_t bits_at(const int64_t* row, int64_t pos, int64_t count) {
  const int64_t word = pos / 64, offset = pos % 64;
  uint64_t v = static_cast<uint64_t>(row[word]) >> offset;
  if (offset + count > 64) v |= static_cast<uint64_t>(row[word + 1]) << (64 - offset);
  return v & low_bits(count);
}

// One thread per output; the output is channels-last, [N][OH][OW][O].
__global__ void binary_conv2d_kernel(const int64_t* pixels, const int64_t* w, ConvDims d, const float* scale,
                                     int64_t scale_stride, float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= d.N * d.OH * d.OW * d.O) return;
  const int64_t o = i % d.O, ow = (i / d.O) % d.OW, oh = (i / (d.O * d.OW)) % d.OH, n = i / (d.O * d.OW * d.OH);
  const int64_t* wrow = w + o * d.Kw;
  long long dot = 0;
  for (int64_t r = 0; r < d.kh; ++r) {
    const int64_t ih = oh * d.sh - d.ph + r * d.dh;
    if (ih < 0 || ih >= d.H) continue;
    for (int64_t c = 0; c < d.kw; ++c) {
      const int64_t iw = ow * d.sw - d.pw + c * d.dw;
      if (iw < 0 || iw >= d.W) continue;
      const int64_t* px = pixels + ((n * d.H + ih) * d.W + iw) * d.Cw;
      const int64_t pos = (r * d.kw + c) * d.C;
      for (int64_t word = 0; word < d.Cw; ++word) {
        const int64_t count = d.C - 64 * word < 64 ? d.C - 64 * word : 64;
        const uint64_t x = static_cast<uint64_t>(px[word]) ^ bits_at(wrow, pos + 64 * word, count);
        dot += count - 2 * __popcll(x & low_bits(count));
      }
    }
  }
  out[i] = static_cast<float>(dot) * (scale ? scale[o * scale_stride] : 1.0f);
}

}  // namespace cuda
}  // namespace qtool
