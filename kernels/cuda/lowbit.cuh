// CUDA int4/int3 weight GEMMs: one warp per output, lanes strided over K, warp-shuffle sums.
// The int8 path sums each group's products exactly in integers before scaling, in group
// order, as the reference does.
#pragma once

#include "launch.h"
#include "pack.cuh"

namespace qtool {
namespace cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ long long warp_sum(long long v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Output (m, n) per warp; blockDim.x is a multiple of 32.
__global__ void lowbit_f32_kernel(const float* x, const uint8_t* w, const float* scale, LowbitDims d, float* out) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= d.M * d.N) return;
  const int64_t m = warp / d.N, n = warp % d.N;
  const uint8_t* row = w + n * d.row_bytes;
  float acc = 0.0f;
  for (int64_t k = lane; k < d.K; k += 32)
    acc += x[m * d.K + k] * (static_cast<float>(code_at(row, d.bits, k)) * scale[n * d.G + k / d.group_size]);
  acc = warp_sum(acc);
  if (lane == 0) out[m * d.N + n] = acc;
}

__global__ void lowbit_i8_kernel(const int8_t* xq, const float* x_scale, const uint8_t* w, const float* scale,
                                 LowbitDims d, float* out) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= d.M * d.N) return;
  const int64_t m = warp / d.N, n = warp % d.N;
  const uint8_t* row = w + n * d.row_bytes;
  float res = 0.0f;
  for (int64_t g = 0; g < d.G; ++g) {
    long long dot = 0;
    const int64_t end = (g + 1) * d.group_size < d.K ? (g + 1) * d.group_size : d.K;
    for (int64_t k = g * d.group_size + lane; k < end; k += 32)
      dot += static_cast<long long>(xq[m * d.K + k]) * code_at(row, d.bits, k);
    dot = warp_sum(dot);
    const float term = static_cast<float>(dot) * scale[n * d.G + g];
    res = g == 0 ? term : res + term;
  }
  if (lane == 0) out[m * d.N + n] = res * x_scale[m];
}

}  // namespace cuda
}  // namespace qtool
