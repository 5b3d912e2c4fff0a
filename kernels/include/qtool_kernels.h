// Shared declarations of the qtool low-bit CPU kernels: packed layouts, argument structs and
// the dispatch table that every ISA build (avx512, avx2, scalar) fills in.
//
// Packed layouts (all little-endian, rows padded along K to whole blocks):
//   int4   blocks of 64 weights in 32 bytes; byte j holds u[j] (low nibble) and u[j+32]
//          (high nibble), u = code + 8 in [0, 15]. One load + shift/AND yields 64 codes in
//          natural order, no shuffles.
//   int3   blocks of 64 weights in 24 bytes, u = code + 4 in [0, 7] stored as bit planes:
//          bytes 0..15 hold the low two bits, byte j = u2[j] | u2[j+16] << 2 | u2[j+32] << 4
//          | u2[j+48] << 6; bytes 16..23 are a 64-bit word whose bit i is bit 2 of u[i].
//   binary bits along K in 64-bit words; bit k % 64 of word k / 64 is 1 for +1 (x >= 0), 0
//          for -1; bits past K are zero.
// Codes that pad K up to a whole block are never read as anything but a product with a
// zero activation, so their value does not matter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qtool {

constexpr int64_t kBlock = 64;          // weights per packed int4/int3 block
constexpr int64_t kBinaryPanel = 8;     // output channels interleaved in a binary weight panel
constexpr int64_t kBinaryTileRows = 48; // rows of the binary A tile (a multiple of every MR)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t block_bytes(int bits) { return bits == 4 ? 32 : 24; }
inline int code_offset(int bits) { return bits == 4 ? 8 : 4; }

// One int4/int3 GEMM: out[m][n] = sum_k x[m][k] * code[n][k] * scale[n][k / group], computed
// for rows n in [n0, n1) of the weights.
struct LowbitArgs {
  int64_t M = 0, N = 0, K = 0;
  int bits = 4;
  int64_t G = 1;             // scale groups per weight row
  int64_t group_blocks = 0;  // 64-blocks per group (all blocks when G == 1)
  const uint8_t* w = nullptr;
  int64_t w_row_bytes = 0;
  const float* scale = nullptr;  // [N][G]
  const float* x = nullptr;      // fp32 activations [M][ldx]
  const int8_t* xq = nullptr;    // int8 activations [M][ldx]
  const float* x_scale = nullptr;  // [M], int8 path
  int64_t ldx = 0;
  // The last, partial 64-block of every row, zero-padded ([M][64]); null when K % 64 == 0.
  const float* x_tail = nullptr;
  const int8_t* xq_tail = nullptr;
  int32_t* lane_sums = nullptr;  // int8 path scratch: [M][G][lanes], offset * activation sums
  float* out = nullptr;
  int64_t ldo = 0;
};

// A tile of at most kBinaryTileRows rows of packed activations against all binary weights.
struct BinaryTileArgs {
  const uint64_t* a = nullptr;       // [kBinaryTileRows][Kw], zero past `rows`
  int64_t rows = 0;
  int64_t Kw = 0;
  int64_t K = 0;
  const uint64_t* panels = nullptr;  // [ceil(N / 8)][Kw][8]
  // Kernels with nibble-LUT popcounts (AVX2) read the panels split into nibble bytes,
  // [ceil(N / 8)][Kw][lo, hi][8] (a byte holds 0..15), and split `a` into `scratch`
  // ([2][kBinaryTileRows][Kw] words); null for the other kernels.
  const uint64_t* panel_nibbles = nullptr;
  uint64_t* scratch = nullptr;
  int64_t N = 0;
  const int32_t* corr = nullptr;     // zero-padding correction [patterns][ceil8(N)], or null
  const int32_t* pattern = nullptr;  // [rows] index into corr, or null
  const float* scale = nullptr;      // [N] or [1] (scale_stride 0), or null for 1
  int64_t scale_stride = 0;
  float* out = nullptr;              // row r, channel n at out[r * ldo + n]
  int64_t ldo = 0;
};

// Geometry of a binary convolution: K = kh * kw * C packed in (tap row, tap column, channel)
// order, Cw words per input pixel.
struct ConvGeometry {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t OH, OW, K, Kw, Cw;
};

inline ConvGeometry conv_geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw,
                                  int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  ConvGeometry g{N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, 0, 0, 0};
  g.OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  g.K = C * kh * kw;
  g.Kw = ceil_div(g.K, 64);
  g.Cw = ceil_div(C, 64);
  return g;
}

struct KernelTable {
  const char* name;
  // Sign bits of `rows` rows of K floats (row stride ldx) into words (row stride ldw).
  void (*pack_sign_rows)(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out,
                         int64_t ldw);
  // Sign bits of `pixels` pixels of C channel planes (x[c * plane_stride + p]) into words
  // out[p * Cw + c / 64]: an NCHW image packed per pixel without a channels-last copy.
  void (*pack_sign_planes)(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out,
                           int64_t Cw);
  void (*binary_tile)(const BinaryTileArgs& t);
  bool binary_wants_nibbles;  // fill BinaryTileArgs::panel_nibbles and scratch
  // Few activation rows: popcounts vectorised along K on the row-major weights [N][Kw], for
  // weight rows [n0, n1) (no panel transposition, which would cost as much as the product).
  // Bits past K are ignored on both sides.
  void (*binary_rows)(const uint64_t* a, int64_t M, const uint64_t* w, int64_t n0, int64_t n1, int64_t Kw, int64_t K,
                      const float* scale, int64_t scale_stride, float* out, int64_t ldo);
  // Per-row symmetric int8: scale = max|x| / 127 (1 for an all-zero row), q = round(x / scale).
  void (*quantize_rows_i8)(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q,
                           int64_t ldq, float* scale);
  int lowbit_lanes;  // int32 lanes of the int8 accumulator (0: no lane sums needed)
  void (*lowbit_lane_sums)(const LowbitArgs& a, int64_t m0, int64_t m1);
  void (*lowbit_i8)(const LowbitArgs& a, int64_t n0, int64_t n1);
  void (*lowbit_f32)(const LowbitArgs& a, int64_t n0, int64_t n1);
};

namespace cpu {
// Generic helpers shared by every ISA build (layout.cpp).
void decode_block(int bits, const uint8_t* block, int8_t* codes);  // 64 signed codes
}  // namespace cpu

}  // namespace qtool
