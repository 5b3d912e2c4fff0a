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

constexpr int64_t kMaxChunks = 32;

// Chunks of every kernel row (field of kw * C bits at bit i * kw * C of the im2col row), and
// for each output word the (at most 4) chunks that overlap it. False when a word needs more.
static bool dense_program(const ConvGeometry& g, Im2col& plan) {
  const int64_t field = g.kw * g.C;
  std::vector<int64_t> chunk_pos, chunk_bits;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t done = 0; done < field; done += 64) {
      const int64_t bits = std::min<int64_t>(64, field - done);
      plan.chunks.push_back({i * g.dh * plan.row_bytes + done / 8, bits == 64 ? ~0ULL : (1ULL << bits) - 1});
      chunk_pos.push_back(i * field + done);
      chunk_bits.push_back(bits);
    }
  const int32_t zero = static_cast<int32_t>(plan.chunks.size());
  for (int64_t w = 0; w < g.Kw; ++w) {
    int used = 0;
    for (size_t c = 0; c < plan.chunks.size(); ++c) {
      const int64_t lo = chunk_pos[c] - 64 * w, hi = lo + chunk_bits[c];
      if (hi <= 0 || lo >= 64) continue;
      if (++used > Im2col::kTermsPerWord) return false;
      plan.terms.push_back({static_cast<int32_t>(c), static_cast<uint8_t>(lo > 0 ? lo : 0),
                            static_cast<uint8_t>(lo < 0 ? -lo : 0)});
    }
    for (; used < Im2col::kTermsPerWord; ++used) plan.terms.push_back({zero, 0, 0});
  }
  return true;
}

Im2col im2col_plan(const ConvGeometry& g, const uint64_t* pixels) {
  Im2col plan;
  // kDense keeps the chunk values of one window in a small array; wider windows go general.
  const int64_t chunks_per_window = g.kh * ceil_div(g.kw * g.C, 64) + 1;  // + the zero chunk
  plan.mode = g.C % 64 == 0 ? Im2col::kAligned
              : (g.C % 8 == 0 && g.dw == 1 && chunks_per_window <= kMaxChunks ? Im2col::kDense : Im2col::kGeneral);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      plan.offset.push_back((i * g.dh * g.W + j * g.dw) * g.Cw);
      plan.pos.push_back((i * g.kw + j) * g.C);
    }
  plan.row_inside.resize(g.OH);
  plan.col_inside.resize(g.OW);
  for (int64_t oh = 0; oh < g.OH; ++oh) plan.row_inside[oh] = outside_taps(oh, g.sh, g.ph, g.dh, g.kh, g.H) == 0;
  for (int64_t ow = 0; ow < g.OW; ++ow) plan.col_inside[ow] = outside_taps(ow, g.sw, g.pw, g.dw, g.kw, g.W) == 0;
  if (plan.mode == Im2col::kDense) {
    const int64_t bytes = g.C / 8, rows = g.N * (g.H + 2 * g.ph);
    plan.row_bytes = (g.W + 2 * g.pw) * bytes;
    plan.stream.assign(rows * plan.row_bytes + 8, 0);  // + 8: the last unaligned load may overrun
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t h = 0; h < g.H; ++h) {
        uint8_t* row = plan.stream.data() + (n * (g.H + 2 * g.ph) + h + g.ph) * plan.row_bytes + g.pw * bytes;
        const uint64_t* px = pixels + (n * g.H + h) * g.W * g.Cw;
        // C <= 64: one 8-byte store per pixel (no libc call); the bytes past C bits are zero and
        // the next pixel overwrites them; the buffer has 8 bytes of slack at its end.
        for (int64_t w = 0; w < g.W; ++w, row += bytes, px += g.Cw)
          bytes <= 8 ? std::memcpy(row, px, 8) : std::memcpy(row, px, bytes);
      }
    if (!dense_program(g, plan)) plan.mode = Im2col::kGeneral;
  }
  return plan;
}

// One output whose window lies inside the input: no bounds checks, precomputed taps.
static inline void window_inside(const ConvGeometry& g, const Im2col& plan, const uint64_t* origin, uint64_t* out) {
  const int64_t taps = g.kh * g.kw, Cw = g.Cw, C = g.C;
  const int64_t* offset = plan.offset.data();
  const int64_t* pos = plan.pos.data();
  if (plan.mode == Im2col::kAligned) {
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < Cw; ++c) out[pos[t] / 64 + c] = origin[offset[t] + c];
    return;
  }
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c = 0; c < Cw; ++c) append_bits(out, pos[t] + 64 * c, origin[offset[t] + c], std::min<int64_t>(64, C - 64 * c));
}

// Any output: taps that read padding are skipped (their bits stay 0; the correction fixes them).
static void window_checked(const ConvGeometry& g, const uint64_t* pixels, int64_t n, int64_t oh, int64_t ow,
                           uint64_t* out) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.sw - g.pw + j * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      const uint64_t* px = pixels + ((n * g.H + ih) * g.W + iw) * g.Cw;
      for (int64_t c = 0; c < g.Cw; ++c)
        append_bits(out, (i * g.kw + j) * g.C + 64 * c, px[c], std::min<int64_t>(64, g.C - 64 * c));
    }
  }
}

// kDense: the window's chunks from the padded stream, then each output word assembled once.
static inline void window_dense(const Im2col& plan, const uint8_t* first, int64_t Kw, uint64_t* out) {
  uint64_t value[kMaxChunks];
  const Im2col::Chunk* chunks = plan.chunks.data();
  const int64_t count = static_cast<int64_t>(plan.chunks.size());
  for (int64_t c = 0; c < count; ++c) {
    std::memcpy(&value[c], first + chunks[c].offset, 8);  // unaligned, little-endian
    value[c] &= chunks[c].mask;
  }
  value[count] = 0;
  const Im2col::Term* t = plan.terms.data();
  for (int64_t w = 0; w < Kw; ++w, t += Im2col::kTermsPerWord)
    out[w] = ((value[t[0].chunk] << t[0].left) >> t[0].right) | ((value[t[1].chunk] << t[1].left) >> t[1].right) |
             ((value[t[2].chunk] << t[2].left) >> t[2].right) | ((value[t[3].chunk] << t[3].left) >> t[3].right);
}

// ORs `value` (bits past `bits` zero) into word-array `out` at bit `pos`: with compile-time
// positions this is a shift or two into registers.
template <int64_t POS, int64_t BITS, size_t WORDS>
static inline void put(uint64_t (&out)[WORDS], uint64_t value) {
  out[POS / 64] |= value << (POS % 64);
  if constexpr (POS % 64 + BITS > 64) out[POS / 64 + 1] |= value >> (64 - POS % 64);
}

// kDense for one geometry known at compile time (C channels, KH x KW taps): every load offset
// within a row, mask and shift is a constant and the row is built in registers.
template <int64_t C, int64_t KH, int64_t KW>
struct DenseWindow {
  static constexpr int64_t kField = KW * C, kWords = (KH * KW * C + 63) / 64;

  template <int64_t I, int64_t DONE>
  static inline void field(uint64_t (&bits)[kWords], const uint8_t* row) {
    constexpr int64_t count = kField - DONE < 64 ? kField - DONE : 64;
    uint64_t v;
    std::memcpy(&v, row + DONE / 8, 8);
    if constexpr (count < 64) v &= (1ULL << count) - 1;
    put<I * kField + DONE, count>(bits, v);
    if constexpr (DONE + 64 < kField) field<I, DONE + 64>(bits, row);
  }

  template <int64_t I>
  static inline void rows(uint64_t (&bits)[kWords], const uint8_t* first, int64_t row_step) {
    field<I, 0>(bits, first + I * row_step);
    if constexpr (I + 1 < KH) rows<I + 1>(bits, first, row_step);
  }

  static inline void run(const uint8_t* first, int64_t row_step, uint64_t* out) {
    uint64_t bits[kWords] = {};
    rows<0>(bits, first, row_step);
    for (int64_t w = 0; w < kWords; ++w) out[w] = bits[w];
  }
};

using DenseFn = void (*)(const uint8_t*, int64_t, uint64_t*);

static DenseFn fixed_dense(const ConvGeometry& g) {
  if (g.kh != 3 || g.kw != 3) return nullptr;
  switch (g.C) {
    case 8: return &DenseWindow<8, 3, 3>::run;
    case 16: return &DenseWindow<16, 3, 3>::run;
    case 24: return &DenseWindow<24, 3, 3>::run;
    case 32: return &DenseWindow<32, 3, 3>::run;
    case 48: return &DenseWindow<48, 3, 3>::run;
    default: return nullptr;
  }
}

void im2col_bits(const ConvGeometry& g, const Im2col& plan, const uint64_t* pixels, int64_t m0, int64_t rows,
                 uint64_t* tile, int32_t* pattern, const PaddingCorrection& pc) {
  if (plan.mode != Im2col::kDense) std::memset(tile, 0, sizeof(uint64_t) * rows * g.Kw);  // dense writes every word
  const int64_t OH = g.OH, OW = g.OW, Kw = g.Kw;
  const DenseFn fixed = plan.mode == Im2col::kDense ? fixed_dense(g) : nullptr;
  // Output coordinates advance with the row instead of being divided out of it.
  int64_t n = m0 / (OH * OW), oh = (m0 / OW) % OH, ow = m0 % OW;
  for (int64_t r = 0; r < rows; ++r) {
    uint64_t* out = tile + r * Kw;
    pattern[r] = pc.pattern(oh, ow);
    if (plan.mode == Im2col::kDense) {
      const uint8_t* first = plan.stream.data() + (n * (g.H + 2 * g.ph) + oh * g.sh) * plan.row_bytes + ow * g.sw * (g.C / 8);
      if (fixed)
        fixed(first, g.dh * plan.row_bytes, out);
      else
        window_dense(plan, first, Kw, out);
    } else if (plan.row_inside[oh] && plan.col_inside[ow]) {
      window_inside(g, plan, pixels + ((n * g.H + oh * g.sh - g.ph) * g.W + ow * g.sw - g.pw) * g.Cw, out);
    } else {
      window_checked(g, pixels, n, oh, ow, out);
    }
    if (++ow == OW) {
      ow = 0;
      if (++oh == OH) {
        oh = 0;
        ++n;
      }
    }
  }
}

}  // namespace cpu
}  // namespace qtool
