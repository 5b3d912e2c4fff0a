// Bit-level im2col of the binary convolution and its exact zero-padding correction.
#include <algorithm>
#include <cstring>

#include "layout.h"

namespace qtool {
namespace cpu {

// Bit i set when tap i of an output at `pos` reads outside [0, size).
static uint64_t outside_taps(int64_t pos, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size) {
  uint64_t mask = 0;
  for (int64_t i = 0; i < taps; ++i) {
    const int64_t in = pos * stride - pad + i * dil;
    if (in < 0 || in >= size) mask |= 1ULL << i;
  }
  return mask;
}

// Index of each position's tap mask in a list of the distinct masks.
static std::vector<int32_t> classify(int64_t count, int64_t stride, int64_t pad, int64_t dil, int64_t taps,
                                     int64_t size, std::vector<uint64_t>& masks) {
  std::vector<int32_t> cls(count);
  for (int64_t p = 0; p < count; ++p) {
    const uint64_t m = outside_taps(p, stride, pad, dil, taps, size);
    const auto it = std::find(masks.begin(), masks.end(), m);
    cls[p] = static_cast<int32_t>(it - masks.begin());
    if (it == masks.end()) masks.push_back(m);
  }
  return cls;
}

// Number of set bits of a packed row in [start, start + len).
static int64_t popcount_range(const uint64_t* row, int64_t start, int64_t len) {
  int64_t count = 0;
  for (int64_t bit = start; bit < start + len;) {
    const int64_t word = bit / 64, offset = bit % 64;
    const int64_t take = std::min<int64_t>(64 - offset, start + len - bit);
    const uint64_t mask = take == 64 ? ~0ULL : ((1ULL << take) - 1) << offset;
    count += __builtin_popcountll(row[word] & mask);
    bit += take;
  }
  return count;
}

PaddingCorrection padding_correction(const ConvGeometry& g, const uint64_t* w) {
  PaddingCorrection pc;
  std::vector<uint64_t> row_masks, col_masks;
  pc.row_class = classify(g.OH, g.sh, g.ph, g.dh, g.kh, g.H, row_masks);
  pc.col_class = classify(g.OW, g.sw, g.pw, g.dw, g.kw, g.W, col_masks);
  pc.cols = static_cast<int64_t>(col_masks.size());
  for (uint64_t m : row_masks) pc.any |= m != 0;
  for (uint64_t m : col_masks) pc.any |= m != 0;
  const int64_t npad = ceil_div(g.O, kBinaryPanel) * kBinaryPanel, taps = g.kh * g.kw;
  // Sum over channels of the +-1 weights of each (output channel, tap).
  std::vector<int32_t> tap_sum(g.O * taps);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t t = 0; t < taps; ++t)
      tap_sum[o * taps + t] = static_cast<int32_t>(2 * popcount_range(w + o * g.Kw, t * g.C, g.C) - g.C);
  pc.table.assign(row_masks.size() * col_masks.size() * npad, 0);
  for (size_t r = 0; r < row_masks.size(); ++r)
    for (size_t c = 0; c < col_masks.size(); ++c) {
      int32_t* out = pc.table.data() + (r * col_masks.size() + c) * npad;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          if (!((row_masks[r] >> i) & 1) && !((col_masks[c] >> j) & 1)) continue;
          for (int64_t o = 0; o < g.O; ++o) out[o] += tap_sum[o * taps + i * g.kw + j];
        }
    }
  return pc;
}

// ORs the `nbits` low bits of `value` into `row` at bit `pos` (bits above nbits are zero).
static inline void append_bits(uint64_t* row, int64_t pos, uint64_t value, int64_t nbits) {
  const int64_t word = pos / 64, offset = pos % 64;
  row[word] |= value << offset;
  if (offset + nbits > 64) row[word + 1] |= value >> (64 - offset);
}

void im2col_bits(const ConvGeometry& g, const uint64_t* pixels, int64_t m0, int64_t rows,
                 uint64_t* tile, int32_t* pattern, const PaddingCorrection& pc) {
  std::memset(tile, 0, sizeof(uint64_t) * rows * g.Kw);
  const bool aligned = g.C % 64 == 0;  // every tap starts on a word: plain copies
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r, n = m / (g.OH * g.OW), oh = (m / g.OW) % g.OH, ow = m % g.OW;
    uint64_t* out = tile + r * g.Kw;
    pattern[r] = pc.pattern(oh, ow);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;  // padded rows stay 0 bits; the correction fixes them
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.sw - g.pw + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        const uint64_t* px = pixels + ((n * g.H + ih) * g.W + iw) * g.Cw;
        const int64_t pos = (i * g.kw + j) * g.C;
        if (aligned) {
          std::memcpy(out + pos / 64, px, sizeof(uint64_t) * g.Cw);
          continue;
        }
        for (int64_t c = 0; c < g.Cw; ++c)
          append_bits(out, pos + 64 * c, px[c], std::min<int64_t>(64, g.C - 64 * c));
      }
    }
  }
}

}  // namespace cpu
}  // namespace qtool
