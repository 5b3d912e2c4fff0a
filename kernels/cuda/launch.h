// Host-side launchers of the CUDA kernels (kernels.cu). Torch-free, so nvcc compiles the
// kernels without parsing the torch headers; the torch glue is ops_cuda.cpp. Each launcher
// enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qtool {
namespace cuda {

struct LowbitDims {
  int64_t M, N, K, G, group_size, row_bytes;
  int bits;
};

struct ConvDims {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, Kw, Cw;
};

cudaError_t pack_codes(const int8_t* codes, int bits, int64_t N, int64_t K, int64_t row_bytes, uint8_t* out,
                       cudaStream_t stream);
cudaError_t unpack_codes(const uint8_t* packed, int bits, int64_t N, int64_t K, int64_t row_bytes, int8_t* out,
                         cudaStream_t stream);
cudaError_t pack_binary(const float* x, int64_t rows, int64_t K, int64_t* out, cudaStream_t stream);
cudaError_t unpack_binary(const int64_t* bits, int64_t rows, int64_t K, float* out, cudaStream_t stream);
cudaError_t quantize_rows_i8(const float* x, int64_t rows, int64_t K, int8_t* q, float* scale, cudaStream_t stream);
cudaError_t lowbit_f32(const float* x, const uint8_t* w, const float* scale, const LowbitDims& d, float* out,
                       cudaStream_t stream);
cudaError_t lowbit_i8(const int8_t* xq, const float* x_scale, const uint8_t* w, const float* scale,
                      const LowbitDims& d, float* out, cudaStream_t stream);
cudaError_t binary_gemm(const int64_t* a, const int64_t* w, int64_t M, int64_t N, int64_t K, const float* scale,
                        int64_t scale_stride, float* out, cudaStream_t stream);
// x: NCHW float; pixels: scratch [N * H * W][Cw]; out: channels-last [N][OH][OW][O].
cudaError_t binary_conv2d(const float* x, int64_t* pixels, const int64_t* w, const ConvDims& d, const float* scale,
                          int64_t scale_stride, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace qtool
