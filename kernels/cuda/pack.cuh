// CUDA kernels of the packing operators (layouts in qtool_kernels.h): one thread per output
// element, plus the per-row int8 quantization (one block per row).
#pragma once

#include <cstdint>

namespace qtool {
namespace cuda {

// Signed code of weight k of a packed int4/int3 row.
__device__ __forceinline__ int code_at(const uint8_t* row, int bits, int64_t k) {
  const int64_t b = k / 64, j = k % 64;
  if (bits == 4) {
    const uint8_t byte = row[b * 32 + (j % 32)];
    return (j < 32 ? byte & 15 : byte >> 4) - 8;
  }
  const uint8_t* block = row + b * 24;
  const int low = (block[j % 16] >> (2 * (j / 16))) & 3;
  const int high = (block[16 + j / 8] >> (j % 8)) & 1;
  return low + 4 * high - 4;
}

__global__ void pack_int4_kernel(const int8_t* codes, int64_t N, int64_t K, int64_t row_bytes, uint8_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * row_bytes) return;
  const int64_t n = i / row_bytes, byte = i % row_bytes, k0 = byte / 32 * 64 + byte % 32, k1 = k0 + 32;
  const int u0 = (k0 < K ? codes[n * K + k0] : 0) + 8, u1 = (k1 < K ? codes[n * K + k1] : 0) + 8;
  out[i] = static_cast<uint8_t>(u0 | (u1 << 4));
}

__global__ void pack_int3_kernel(const int8_t* codes, int64_t N, int64_t K, int64_t row_bytes, uint8_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * row_bytes) return;
  const int64_t n = i / row_bytes, b = (i % row_bytes) / 24, byte = (i % row_bytes) % 24;
  auto u = [&](int64_t j) {
    const int64_t k = b * 64 + j;
    return (k < K ? codes[n * K + k] : 0) + 4;
  };
  int value = 0;
  if (byte < 16) {
    for (int t = 0; t < 4; ++t) value |= (u(byte + 16 * t) & 3) << (2 * t);
  } else {
    for (int t = 0; t < 8; ++t) value |= (u((byte - 16) * 8 + t) >> 2) << t;
  }
  out[i] = static_cast<uint8_t>(value);
}

__global__ void unpack_kernel(const uint8_t* packed, int bits, int64_t N, int64_t K, int64_t row_bytes, int8_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * K) return;
  out[i] = static_cast<int8_t>(code_at(packed + (i / K) * row_bytes, bits, i % K));
}

__global__ void pack_binary_kernel(const float* x, int64_t rows, int64_t K, int64_t Kw, int64_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= rows * Kw) return;
  const int64_t r = i / Kw, w = i % Kw;
  uint64_t bits = 0;
  for (int j = 0; j < 64 && w * 64 + j < K; ++j) bits |= uint64_t(x[r * K + w * 64 + j] >= 0.0f) << j;
  out[i] = static_cast<int64_t>(bits);
}

__global__ void unpack_binary_kernel(const int64_t* bits, int64_t rows, int64_t K, int64_t Kw, float* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= rows * K) return;
  const int64_t r = i / K, k = i % K;
  out[i] = (static_cast<uint64_t>(bits[r * Kw + k / 64]) >> (k % 64)) & 1 ? 1.0f : -1.0f;
}

// One block per row: max |x| by a shared-memory reduction, then round(x / scale).
__global__ void quantize_rows_i8_kernel(const float* x, int64_t K, int8_t* q, float* scale) {
  __shared__ float peak[256];
  const float* row = x + blockIdx.x * K;
  float m = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, fabsf(row[k]));
  peak[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) peak[threadIdx.x] = fmaxf(peak[threadIdx.x], peak[threadIdx.x + s]);
    __syncthreads();
  }
  const float amax = peak[0];
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    q[blockIdx.x * K + k] = static_cast<int8_t>(fminf(fmaxf(rintf(row[k] / s), -127.0f), 127.0f));
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

}  // namespace cuda
}  // namespace qtool
