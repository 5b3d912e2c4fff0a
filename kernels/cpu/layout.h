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

// Panels split into nibble bytes, [panels][Kw][lo, hi][8] (for nibble-LUT popcounts).
void binary_nibble_panels(const uint64_t* panels, int64_t count, int64_t Kw, uint64_t* out);

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

// What im2col precomputes once per call.
//  - kDense (C % 8 == 0, not a multiple of 64, no column dilation): every input row is stored
//    once as a zero-padded bit stream, C bits per pixel; a kernel row of any output is then
//    kw * C contiguous, byte-aligned bits: one unaligned 64-bit load per 64 bits, no bounds
//    checks (padding reads as 0 bits, which the padding correction expects).
//  - kAligned (C % 64 == 0): every tap is whole words, copied.
//  - kGeneral: taps appended bit by bit-field.
// For the last two, outputs whose window lies inside the input use precomputed tap offsets.
struct Im2col {
  enum Mode { kDense, kAligned, kGeneral } mode;
  std::vector<int64_t> offset;  // per tap: words from the window's top-left pixel
  std::vector<int64_t> pos;     // per tap: first bit of the tap in the row
  std::vector<uint8_t> row_inside, col_inside;  // per oh / ow: no tap reads padding
  std::vector<uint8_t> stream;  // kDense: [N][H + 2 ph][row_bytes] padded pixel bits
  int64_t row_bytes = 0;
  // kDense program: the window is read as 64-bit chunks (byte offset from the window's first
  // byte, mask); output word w is the OR of terms[4w .. 4w + 3], each (chunk << left) >> right.
  // Unused terms read chunk `chunks.size()`, which is always 0: no branches per pixel.
  static constexpr int kTermsPerWord = 4;
  struct Chunk {
    int64_t offset;
    uint64_t mask;
  };
  struct Term {
    int32_t chunk;
    uint8_t left, right;
  };
  std::vector<Chunk> chunks;
  std::vector<Term> terms;
};
Im2col im2col_plan(const ConvGeometry& g, const uint64_t* pixels);

// im2col of output pixels [m0, m0 + rows) into a tile [rows][Kw]; K is ordered (tap row, tap
// column, channel), the order of the packed weights. `pixels` holds the sign bits of the
// input, [N * H * W][Cw].
void im2col_bits(const ConvGeometry& g, const Im2col& plan, const uint64_t* pixels, int64_t m0, int64_t rows,
                 uint64_t* tile, int32_t* pattern, const PaddingCorrection& pc);

}  // namespace cpu
}  // namespace qtool
