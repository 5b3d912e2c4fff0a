// Launchers of the CUDA kernels (pack.cuh, lowbit.cuh, binary.cuh); see launch.h.
#include "binary.cuh"
#include "launch.h"
#include "lowbit.cuh"
#include "pack.cuh"

namespace qtool {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned int blocks(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreads - 1) / kThreads);
}

}  // namespace

cudaError_t pack_codes(const int8_t* codes, int bits, int64_t N, int64_t K, int64_t row_bytes, uint8_t* out,
                       cudaStream_t stream) {
  if (N * row_bytes == 0) return cudaSuccess;
  auto kernel = bits == 4 ? pack_int4_kernel : pack_int3_kernel;
  kernel<<<blocks(N * row_bytes), kThreads, 0, stream>>>(codes, N, K, row_bytes, out);
  return cudaGetLastError();
}

cudaError_t unpack_codes(const uint8_t* packed, int bits, int64_t N, int64_t K, int64_t row_bytes, int8_t* out,
                         cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  unpack_kernel<<<blocks(N * K), kThreads, 0, stream>>>(packed, bits, N, K, row_bytes, out);
  return cudaGetLastError();
}

cudaError_t pack_binary(const float* x, int64_t rows, int64_t K, int64_t* out, cudaStream_t stream) {
  const int64_t Kw = (K + 63) / 64;
  if (rows * Kw == 0) return cudaSuccess;
  pack_binary_kernel<<<blocks(rows * Kw), kThreads, 0, stream>>>(x, rows, K, Kw, out);
  return cudaGetLastError();
}

cudaError_t unpack_binary(const int64_t* bits, int64_t rows, int64_t K, float* out, cudaStream_t stream) {
  if (rows * K == 0) return cudaSuccess;
  unpack_binary_kernel<<<blocks(rows * K), kThreads, 0, stream>>>(bits, rows, K, (K + 63) / 64, out);
  return cudaGetLastError();
}

cudaError_t quantize_rows_i8(const float* x, int64_t rows, int64_t K, int8_t* q, float* scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  quantize_rows_i8_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(x, K, q, scale);
  return cudaGetLastError();
}

cudaError_t lowbit_f32(const float* x, const uint8_t* w, const float* scale, const LowbitDims& d, float* out,
                       cudaStream_t stream) {
  if (d.M * d.N == 0) return cudaSuccess;
  lowbit_f32_kernel<<<blocks(32 * d.M * d.N), kThreads, 0, stream>>>(x, w, scale, d, out);
  return cudaGetLastError();
}

cudaError_t lowbit_i8(const int8_t* xq, const float* x_scale, const uint8_t* w, const float* scale,
                      const LowbitDims& d, float* out, cudaStream_t stream) {
  if (d.M * d.N == 0) return cudaSuccess;
  lowbit_i8_kernel<<<blocks(32 * d.M * d.N), kThreads, 0, stream>>>(xq, x_scale, w, scale, d, out);
  return cudaGetLastError();
}

cudaError_t binary_gemm(const int64_t* a, const int64_t* w, int64_t M, int64_t N, int64_t K, const float* scale,
                        int64_t scale_stride, float* out, cudaStream_t stream) {
  if (M * N == 0) return cudaSuccess;
  binary_gemm_kernel<<<blocks(32 * M * N), kThreads, 0, stream>>>(a, w, M, N, K, scale, scale_stride, out);
  return cudaGetLastError();
}

cudaError_t binary_conv2d(const float* x, int64_t* pixels, const int64_t* w, const ConvDims& d, const float* scale,
                          int64_t scale_stride, float* out, cudaStream_t stream) {
  const int64_t outputs = d.N * d.OH * d.OW * d.O, words = d.N * d.H * d.W * d.Cw;
  if (outputs == 0) return cudaSuccess;
  if (words > 0) pack_pixels_kernel<<<blocks(words), kThreads, 0, stream>>>(x, d.N, d.C, d.H * d.W, d.Cw, pixels);
  binary_conv2d_kernel<<<blocks(outputs), kThreads, 0, stream>>>(pixels, w, d, scale, scale_stride, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qtool
