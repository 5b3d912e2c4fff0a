// ISA-independent helpers of the CPU kernels: packing int4/int3 codes, binary weight panels,
// and the bit-level im2col of the binary convolution with its zero-padding correction.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool_kernels.h"

namespace qtool {
namespace cpu {

// Codes [N][K] (already range-checked) to packed rows of ceil(K / 64) blocks, and back.
void pack_int4(const int8_t* codes, int64_t N, int64_t K, uint8_t* out);
void unpack_int4(const uint8_t* packed, int64_t N, int64_t K, int8_t* codes);
void pack_int3(const int8_t* codes, int64_t N, int64_t K, uint8_t* out);
void unpack_int3(const uint8_t* packed, int64_t N, int64_t K, int8_t* codes);

// Weights [N][Kw] to panels [ceil(N / 8)][Kw][8]; bits past K and missing channels are zero.
void binary_panels(const uint64_t* w, int64_t N, int64_t Kw, int64_t K, uint64_t* panels);

// Rows of packed bits into a tile, clearing the bits past K (callers may pass any tail).
void copy_bit_rows(const uint64_t* a, int64_t rows, int64_t Kw, int64_t K, uint64_t* tile);

// Taps that fall into the zero padding are left as 0 bits (= -1) by im2col; the true
// contribution of a padded tap is 0, so the dot product is off by the sum of the weights over
// those taps. Which taps are padded depends only on (row class of oh, column class of ow):
// `table[(row_class[oh] * cols + col_class[ow]) * npad + o]` holds the correction.
struct PaddingCorrection {
  std::vector<int32_t> table;
  std::vector<int32_t> row_class, col_class;
  int64_t cols = 1;
  bool any = false;  // false when no output touches the padding
  int32_t pattern(int64_t oh, int64_t ow) const { return row_class[oh] * cols + col_class[ow]; }
};
PaddingCorrection padding_correction(const ConvGeometry& g, const uint64_t* w);

// im2col of output pixels [m0, m0 + rows) into a zeroed tile [rows][Kw]; K is ordered
// (tap row, tap column, channel), the order of the packed weights. `pixels` holds the sign
// bits of the input, [N * H * W][Cw].
void im2col_bits(const ConvGeometry& g, const uint64_t* pixels, int64_t m0, int64_t rows,
                 uint64_t* tile, int32_t* pattern, const PaddingCorrection& pc);

}  // namespace cpu
}  // namespace qtool
