// XNOR-popcount kernels, compiled once per ISA (isa.h; isa_neon.h on aarch64): sign-bit
// packing of float rows and the binary GEMM tile. With +-1 stored as bits,
// dot(a, w) = K - 2 * popcount(a XOR w).
//
// The tile holds up to 48 rows of packed activations; the weights come as panels of 8 output
// channels interleaved word by word ([panel][word][8]), so one vector load gives the same word
// of 8 channels and each activation word is broadcast against it: the reduction stays in
// integer lanes, one lane per output channel, and no horizontal sums are needed.
#include "qtool_kernels.h"
#if defined(QTOOL_ISA_NEON) || defined(QTOOL_ISA_NEONDOT)
#include "isa_neon.h"  // aarch64 builds; isa.h covers x86 and scalar
#else
#include "isa.h"
#endif

namespace qtool {
namespace cpu {
namespace QTOOL_ISA_NS {
namespace {

// Final value of one output: exact integer dot (plus the zero-padding correction of convs),
// then one multiplication by the scale, as the reference does.
inline float finish(const BinaryTileArgs& t, int64_t row, int64_t n, int64_t popcount) {
  int64_t dot = t.K - 2 * popcount;
  if (t.corr) dot += t.corr[t.pattern[row] * ceil_div(t.N, kBinaryPanel) * kBinaryPanel + n];
  return static_cast<float>(dot) * (t.scale ? t.scale[n * t.scale_stride] : 1.0f);
}

#if defined(QTOOL_ISA_AVX512)
// ------------------------------------------------------------------------------- AVX-512
template <int MR, int NR>
void tile(const BinaryTileArgs& t, int64_t r0, int64_t p0) {
  const int64_t Kw = t.Kw;
  const uint64_t* a = t.a + r0 * Kw;
  const uint64_t* w = t.panels + p0 * Kw * kBinaryPanel;
  __m512i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kw; ++k) {
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + (r * Kw + k) * kBinaryPanel);
    for (int m = 0; m < MR; ++m) {
      const __m512i av = _mm512_set1_epi64(static_cast<long long>(a[m * Kw + k]));
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm512_add_epi64(acc[m][r], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[r])));
    }
  }
  // Everything the epilogue reads goes to locals first: the masked stores take void*, so the
  // compiler would otherwise reload each field of `t` after every store.
  const int64_t npad = ceil_div(t.N, kBinaryPanel) * kBinaryPanel, rows = t.rows, ldo = t.ldo, N = t.N;
  const int32_t* corr = t.corr;
  const int32_t* pattern = t.pattern;
  float* out = t.out;
  const __m512i k = _mm512_set1_epi64(t.K);
  __m256 scale[NR];
  __mmask8 valid[NR];
  for (int r = 0; r < NR; ++r) {
    const int64_t n0 = (p0 + r) * kBinaryPanel;
    valid[r] = N - n0 >= 8 ? 0xFF : static_cast<__mmask8>((1u << (N - n0)) - 1);
    scale[r] = !t.scale ? _mm256_set1_ps(1.0f)
               : t.scale_stride ? _mm256_maskz_loadu_ps(valid[r], t.scale + n0) : _mm256_set1_ps(t.scale[0]);
  }
  for (int m = 0; m < MR && r0 + m < rows; ++m) {
    const int64_t row = r0 + m;
    for (int r = 0; r < NR; ++r) {
      const int64_t n0 = (p0 + r) * kBinaryPanel;
      __m512i dot = _mm512_sub_epi64(k, _mm512_slli_epi64(acc[m][r], 1));
      if (corr)
        dot = _mm512_add_epi64(dot, _mm512_cvtepi32_epi64(_mm256_loadu_si256(
                                        reinterpret_cast<const __m256i*>(corr + pattern[row] * npad + n0))));
      // exact: |dot| <= K < 2^24
      _mm256_mask_storeu_ps(out + row * ldo + n0, valid[r], _mm256_mul_ps(_mm512_cvtepi64_ps(dot), scale[r]));
    }
  }
}

// Rows in groups of MR, the rest one by one, for NR panels starting at p0.
template <int MR, int NR>
void panels(const BinaryTileArgs& t, int64_t p0) {
  int64_t r = 0;
  for (; r + MR <= t.rows; r += MR) tile<MR, NR>(t, r, p0);
  for (; r < t.rows; ++r) tile<1, NR>(t, r, p0);
}

void binary_tile_impl(const BinaryTileArgs& t) {
  const int64_t np = ceil_div(t.N, kBinaryPanel);
  int64_t p = 0;
  for (; p + 4 <= np; p += 4) panels<6, 4>(t, p);  // 24 accumulators + 4 weight vectors
  for (; p + 2 <= np; p += 2) panels<12, 2>(t, p);
  for (; p < np; ++p) panels<24, 1>(t, p);
}

void pack_sign_rows_impl(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out, int64_t ldw) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t words = ceil_div(K, 64);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    for (int64_t wd = 0; wd < words; ++wd) {
      uint64_t bits = 0;
      for (int q = 0; q < 4; ++q) {
        const int64_t k = wd * 64 + q * 16;
        if (k >= K) break;
        const __mmask16 valid = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, xr + k), zero, _CMP_GE_OQ);
        bits |= static_cast<uint64_t>(ge) << (16 * q);
      }
      out[i * ldw + wd] = bits;
    }
  }
}

// Popcount of (a ^ w) over all but the last word, 8 words per vector.
inline int64_t xor_popcount_body(const uint64_t* a, const uint64_t* w, int64_t words) {
  __m512i acc = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 8 <= words; k += 8)
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(a + k), _mm512_loadu_si512(w + k))));
  if (k < words) {
    const __mmask8 m = static_cast<__mmask8>((1u << (words - k)) - 1);
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(m, a + k),
                                                                       _mm512_maskz_loadu_epi64(m, w + k))));
  }
  return _mm512_reduce_add_epi64(acc);
}

// 16 pixels per step: one 16-float load per channel, its sign mask ORed into the channel's bit
// of 16 words (two vectors of 8).
void pack_sign_planes_impl(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out,
                           int64_t Cw) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; p < pixels; p += 16) {
    const int64_t count = pixels - p < 16 ? pixels - p : 16;
    const __mmask16 valid = count == 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
    for (int64_t w = 0; w < Cw; ++w) {
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      const int64_t c1 = (w + 1) * 64 < C ? (w + 1) * 64 : C;
      for (int64_t c = w * 64; c < c1; ++c) {
        const __mmask16 ge =
            _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, x + c * plane_stride + p), zero, _CMP_GE_OQ);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(1ULL << (c - w * 64)));
        lo = _mm512_mask_or_epi64(lo, static_cast<__mmask8>(ge), lo, bit);
        hi = _mm512_mask_or_epi64(hi, static_cast<__mmask8>(ge >> 8), hi, bit);
      }
      if (Cw == 1) {
        _mm512_mask_storeu_epi64(out + p, static_cast<__mmask8>(valid), lo);
        _mm512_mask_storeu_epi64(out + p + 8, static_cast<__mmask8>(valid >> 8), hi);
      } else {
        alignas(64) uint64_t words[16];
        _mm512_store_si512(words, lo);
        _mm512_store_si512(words + 8, hi);
        for (int64_t j = 0; j < count; ++j) out[(p + j) * Cw + w] = words[j];
      }
    }
  }
}

#elif defined(QTOOL_ISA_AVX2)
// ---------------------------------------------------------------------------------- AVX2
// Popcount by nibble lookup (vpshufb). Both operands come split into nibble bytes, so that
// (a ^ w) & 0xF = a_lo ^ w_lo: per 256 bits, 2 xors, 2 lookups and 2 byte adds. Per-byte
// counts accumulate for up to 31 words (31 * 8 < 256) before vpsadbw widens them into the
// 64-bit lane of their channel.
constexpr int kMR = 3;  // 3 rows x 8 channels: 6 byte accumulators, 4 weight vectors

template <int MR>
void tile(const BinaryTileArgs& t, const uint64_t* alo, const uint64_t* ahi, int64_t r0, int64_t p) {
  const int64_t Kw = t.Kw;
  const uint64_t* w = t.panel_nibbles + p * Kw * 2 * kBinaryPanel;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  __m256i total[MR][2];
  for (int m = 0; m < MR; ++m) total[m][0] = total[m][1] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < Kw; k0 += 31) {
    const int64_t k1 = k0 + 31 < Kw ? k0 + 31 : Kw;
    __m256i bytes[MR][2];
    for (int m = 0; m < MR; ++m) bytes[m][0] = bytes[m][1] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i* wk = reinterpret_cast<const __m256i*>(w + k * 2 * kBinaryPanel);
      const __m256i wlo0 = _mm256_loadu_si256(wk), wlo1 = _mm256_loadu_si256(wk + 1);
      const __m256i whi0 = _mm256_loadu_si256(wk + 2), whi1 = _mm256_loadu_si256(wk + 3);
      for (int m = 0; m < MR; ++m) {
        const __m256i al = _mm256_set1_epi64x(static_cast<long long>(alo[(r0 + m) * Kw + k]));
        const __m256i ah = _mm256_set1_epi64x(static_cast<long long>(ahi[(r0 + m) * Kw + k]));
        bytes[m][0] = _mm256_add_epi8(bytes[m][0], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wlo0)),
                                                                   _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, whi0))));
        bytes[m][1] = _mm256_add_epi8(bytes[m][1], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wlo1)),
                                                                   _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, whi1))));
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < 2; ++h)
        total[m][h] = _mm256_add_epi64(total[m][h], _mm256_sad_epu8(bytes[m][h], _mm256_setzero_si256()));
  }
  // The epilogue in vector lanes, as finish() computes it: the 8 counts narrowed to int32
  // (exact: |dot| <= K < 2^24), dot = K - 2 * count (+ padding correction), times the scale.
  const int64_t n0 = p * kBinaryPanel, npad = ceil_div(t.N, kBinaryPanel) * kBinaryPanel;
  const int live = static_cast<int>(t.N - n0 < 8 ? t.N - n0 : 8);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(live), lanes);
  const __m256 scale = !t.scale ? _mm256_set1_ps(1.0f)
                       : t.scale_stride ? _mm256_maskload_ps(t.scale + n0, valid) : _mm256_set1_ps(t.scale[0]);
  const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i k = _mm256_set1_epi32(static_cast<int>(t.K));
  for (int m = 0; m < MR && r0 + m < t.rows; ++m) {
    const int64_t row = r0 + m;
    const __m256i first = _mm256_permutevar8x32_epi32(total[m][0], low_dwords);
    const __m256i second = _mm256_permutevar8x32_epi32(total[m][1], low_dwords);
    const __m256i count = _mm256_permute2x128_si256(first, second, 0x20);
    __m256i dot = _mm256_sub_epi32(k, _mm256_slli_epi32(count, 1));
    if (t.corr)
      dot = _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.corr + t.pattern[row] * npad + n0)));
    const __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale);
    if (live == 8) {
      _mm256_storeu_ps(t.out + row * t.ldo + n0, y);
    } else {
      _mm256_maskstore_ps(t.out + row * t.ldo + n0, valid, y);
    }
  }
}

void binary_tile_impl(const BinaryTileArgs& t) {
  // Split the activation tile into nibble bytes once; every panel reuses it.
  const int64_t words = t.rows * t.Kw;
  uint64_t* alo = t.scratch;
  uint64_t* ahi = t.scratch + kBinaryTileRows * t.Kw;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 4 <= words; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.a + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(alo + i), _mm256_and_si256(v, nib));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ahi + i), _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
  }
  for (; i < words; ++i) {
    alo[i] = t.a[i] & 0x0F0F0F0F0F0F0F0FULL;
    ahi[i] = (t.a[i] >> 4) & 0x0F0F0F0F0F0F0F0FULL;
  }
  const int64_t np = ceil_div(t.N, kBinaryPanel);
  for (int64_t p = 0; p < np; ++p) {
    int64_t r = 0;
    for (; r + kMR <= t.rows; r += kMR) tile<kMR>(t, alo, ahi, r, p);
    for (; r < t.rows; ++r) tile<1>(t, alo, ahi, r, p);
  }
}

void pack_sign_rows_impl(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out, int64_t ldw) {
  const __m256 zero = _mm256_setzero_ps();
  const int64_t words = ceil_div(K, 64);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    for (int64_t wd = 0; wd < words; ++wd) {
      uint64_t bits = 0;
      int64_t k = wd * 64;
      const int64_t end = k + 64 < K ? k + 64 : K;
      for (; k + 8 <= end; k += 8) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xr + k), zero, _CMP_GE_OQ));
        bits |= static_cast<uint64_t>(mask) << (k - wd * 64);
      }
      for (; k < end; ++k) bits |= static_cast<uint64_t>(xr[k] >= 0.0f) << (k - wd * 64);
      out[i * ldw + wd] = bits;
    }
  }
}

// Popcount of (a ^ w) over `words` words: nibble lookups, 4 words per vector.
inline int64_t xor_popcount_body(const uint64_t* a, const uint64_t* w, int64_t words) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256i total = _mm256_setzero_si256();
  int64_t k = 0;
  while (k + 4 <= words) {
    __m256i bytes = _mm256_setzero_si256();
    for (int i = 0; i < 31 && k + 4 <= words; ++i, k += 4) {  // byte counts stay below 256
      const __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k)),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      bytes = _mm256_add_epi8(bytes, _mm256_shuffle_epi8(lut, _mm256_and_si256(x, nib)));
      bytes = _mm256_add_epi8(bytes, _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), nib)));
    }
    total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, _mm256_setzero_si256()));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total);
  int64_t pc = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; k < words; ++k) pc += _mm_popcnt_u64(a[k] ^ w[k]);
  return pc;
}

// 4 pixels per step: each channel's compare mask, widened to 64-bit lanes, selects its bit.
void pack_sign_planes_impl(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out,
                           int64_t Cw) {
  const __m128 zero = _mm_setzero_ps();
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4)
    for (int64_t w = 0; w < Cw; ++w) {
      __m256i acc = _mm256_setzero_si256();
      const int64_t c1 = (w + 1) * 64 < C ? (w + 1) * 64 : C;
      for (int64_t c = w * 64; c < c1; ++c) {
        const __m128i ge = _mm_castps_si128(_mm_cmpge_ps(_mm_loadu_ps(x + c * plane_stride + p), zero));
        const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(1ULL << (c - w * 64)));
        acc = _mm256_or_si256(acc, _mm256_and_si256(_mm256_cvtepi32_epi64(ge), bit));
      }
      alignas(32) uint64_t words[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(words), acc);
      for (int j = 0; j < 4; ++j) out[(p + j) * Cw + w] = words[j];
    }
  for (; p < pixels; ++p)
    for (int64_t w = 0; w < Cw; ++w) {
      uint64_t bits = 0;
      for (int64_t c = w * 64; c < C && c < (w + 1) * 64; ++c)
        bits |= static_cast<uint64_t>(x[c * plane_stride + p] >= 0.0f) << (c - w * 64);
      out[p * Cw + w] = bits;
    }
}

#elif defined(QTOOL_ISA_NEON)
// ---------------------------------------------------------------------------------- NEON
// Popcount per byte (vcntq_u8) of a XOR w, pairwise added into 16-bit lanes (vpadalq_u8, the
// uadalp of Larq's kernels): a lane gains at most 16 per 128-bit step, so 4095 steps fit
// before the lanes are widened to 32 bits.
constexpr int kMR = 3;             // 3 rows x 8 channels: 12 accumulators + 4 weight vectors
constexpr int64_t kFlush = 4095;   // words (or word pairs) per 16-bit accumulation

template <int MR>
void tile(const BinaryTileArgs& t, int64_t r0, int64_t p) {
  const int64_t Kw = t.Kw;
  const uint64_t* a = t.a + r0 * Kw;
  const uint64_t* w = t.panels + p * Kw * kBinaryPanel;
  uint32x4_t total[MR][4];  // channels 2j, 2j + 1: two 32-bit lanes each
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) total[m][j] = vdupq_n_u32(0);
  for (int64_t k0 = 0; k0 < Kw; k0 += kFlush) {
    const int64_t k1 = k0 + kFlush < Kw ? k0 + kFlush : Kw;
    uint16x8_t acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = vdupq_n_u16(0);
    for (int64_t k = k0; k < k1; ++k) {
      uint8x16_t wv[4];
      for (int j = 0; j < 4; ++j) wv[j] = vreinterpretq_u8_u64(vld1q_u64(w + k * kBinaryPanel + 2 * j));
      for (int m = 0; m < MR; ++m) {
        const uint8x16_t av = vreinterpretq_u8_u64(vdupq_n_u64(a[m * Kw + k]));
        for (int j = 0; j < 4; ++j) acc[m][j] = vpadalq_u8(acc[m][j], vcntq_u8(veorq_u8(av, wv[j])));
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) total[m][j] = vpadalq_u16(total[m][j], acc[m][j]);
  }
  for (int m = 0; m < MR && r0 + m < t.rows; ++m)
    for (int j = 0; j < 4; ++j) {
      const uint64x2_t pc = vpaddlq_u32(total[m][j]);
      for (int h = 0; h < 2; ++h) {
        const int64_t n = p * kBinaryPanel + 2 * j + h;
        if (n < t.N) t.out[(r0 + m) * t.ldo + n] = finish(t, r0 + m, n, static_cast<int64_t>(h ? vgetq_lane_u64(pc, 1) : vgetq_lane_u64(pc, 0)));
      }
    }
}

void binary_tile_impl(const BinaryTileArgs& t) {
  const int64_t np = ceil_div(t.N, kBinaryPanel);
  for (int64_t p = 0; p < np; ++p) {
    int64_t r = 0;
    for (; r + kMR <= t.rows; r += kMR) tile<kMR>(t, r, p);
    for (; r < t.rows; ++r) tile<1>(t, r, p);
  }
}

// Byte i of the result has bit j set when x[8 i + j] >= 0, for 8 floats per byte.
inline uint8_t sign_byte(const float* x) {
  const float32x4_t zero = vdupq_n_f32(0.0f);
  const uint8x8_t weight = {1, 2, 4, 8, 16, 32, 64, 128};
  const uint16x8_t ge = vcombine_u16(vmovn_u32(vcgeq_f32(vld1q_f32(x), zero)), vmovn_u32(vcgeq_f32(vld1q_f32(x + 4), zero)));
  return vaddv_u8(vand_u8(vmovn_u16(ge), weight));
}

void pack_sign_rows_impl(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out, int64_t ldw) {
  const int64_t words = ceil_div(K, 64);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    for (int64_t wd = 0; wd < words; ++wd) {
      uint64_t bits = 0;
      int64_t k = wd * 64;
      const int64_t end = k + 64 < K ? k + 64 : K;
      for (; k + 8 <= end; k += 8) bits |= static_cast<uint64_t>(sign_byte(xr + k)) << (k - wd * 64);
      for (; k < end; ++k) bits |= static_cast<uint64_t>(xr[k] >= 0.0f) << (k - wd * 64);
      out[i * ldw + wd] = bits;
    }
  }
}

// Popcount of (a ^ w) over `words` words, 2 words per vector.
inline int64_t xor_popcount_body(const uint64_t* a, const uint64_t* w, int64_t words) {
  uint64x2_t total = vdupq_n_u64(0);
  int64_t k = 0;
  while (k + 2 <= words) {
    uint16x8_t acc = vdupq_n_u16(0);
    for (int64_t i = 0; i < kFlush && k + 2 <= words; ++i, k += 2)
      acc = vpadalq_u8(acc, vcntq_u8(veorq_u8(vreinterpretq_u8_u64(vld1q_u64(a + k)), vreinterpretq_u8_u64(vld1q_u64(w + k)))));
    total = vpadalq_u32(total, vpaddlq_u16(acc));
  }
  int64_t pc = static_cast<int64_t>(vaddvq_u64(total));
  for (; k < words; ++k) pc += __builtin_popcountll(a[k] ^ w[k]);
  return pc;
}

// 4 pixels per step: each channel's compare mask, widened to 64-bit lanes, selects its bit.
void pack_sign_planes_impl(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out,
                           int64_t Cw) {
  const float32x4_t zero = vdupq_n_f32(0.0f);
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4)
    for (int64_t w = 0; w < Cw; ++w) {
      uint64x2_t lo = vdupq_n_u64(0), hi = vdupq_n_u64(0);
      const int64_t c1 = (w + 1) * 64 < C ? (w + 1) * 64 : C;
      for (int64_t c = w * 64; c < c1; ++c) {
        const uint32x4_t ge = vcgeq_f32(vld1q_f32(x + c * plane_stride + p), zero);
        const uint64x2_t bit = vdupq_n_u64(1ULL << (c - w * 64));
        lo = vorrq_u64(lo, vandq_u64(vreinterpretq_u64_s64(vmovl_s32(vreinterpret_s32_u32(vget_low_u32(ge)))), bit));
        hi = vorrq_u64(hi, vandq_u64(vreinterpretq_u64_s64(vmovl_high_s32(vreinterpretq_s32_u32(ge))), bit));
      }
      out[p * Cw + w] = vgetq_lane_u64(lo, 0);
      out[(p + 1) * Cw + w] = vgetq_lane_u64(lo, 1);
      out[(p + 2) * Cw + w] = vgetq_lane_u64(hi, 0);
      out[(p + 3) * Cw + w] = vgetq_lane_u64(hi, 1);
    }
  for (; p < pixels; ++p)
    for (int64_t w = 0; w < Cw; ++w) {
      uint64_t bits = 0;
      for (int64_t c = w * 64; c < C && c < (w + 1) * 64; ++c)
        bits |= static_cast<uint64_t>(x[c * plane_stride + p] >= 0.0f) << (c - w * 64);
      out[p * Cw + w] = bits;
    }
}

#else
// -------------------------------------------------------------------------------- scalar
void binary_tile_impl(const BinaryTileArgs& t) {
  for (int64_t row = 0; row < t.rows; ++row) {
    const uint64_t* a = t.a + row * t.Kw;
    for (int64_t n = 0; n < t.N; ++n) {
      const uint64_t* w = t.panels + (n / kBinaryPanel) * t.Kw * kBinaryPanel + n % kBinaryPanel;
      int64_t pc = 0;
      for (int64_t k = 0; k < t.Kw; ++k) pc += __builtin_popcountll(a[k] ^ w[k * kBinaryPanel]);
      t.out[row * t.ldo + n] = finish(t, row, n, pc);
    }
  }
}

void pack_sign_rows_impl(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out, int64_t ldw) {
  const int64_t words = ceil_div(K, 64);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t wd = 0; wd < words; ++wd) out[i * ldw + wd] = 0;
    for (int64_t k = 0; k < K; ++k)
      out[i * ldw + k / 64] |= static_cast<uint64_t>(x[i * ldx + k] >= 0.0f) << (k % 64);
  }
}
inline int64_t xor_popcount_body(const uint64_t* a, const uint64_t* w, int64_t words) {
  int64_t pc = 0;
  for (int64_t k = 0; k < words; ++k) pc += __builtin_popcountll(a[k] ^ w[k]);
  return pc;
}

void pack_sign_planes_impl(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out,
                           int64_t Cw) {
  for (int64_t p = 0; p < pixels * Cw; ++p) out[p] = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < pixels; ++p)
      out[p * Cw + c / 64] |= static_cast<uint64_t>(x[c * plane_stride + p] >= 0.0f) << (c % 64);
}
#endif

}  // namespace

void pack_sign_planes(const float* x, int64_t C, int64_t plane_stride, int64_t pixels, uint64_t* out, int64_t Cw) {
  pack_sign_planes_impl(x, C, plane_stride, pixels, out, Cw);
}

void binary_tile(const BinaryTileArgs& t) { binary_tile_impl(t); }

void binary_rows(const uint64_t* a, int64_t M, const uint64_t* w, int64_t n0, int64_t n1, int64_t Kw, int64_t K,
                 const float* scale, int64_t scale_stride, float* out, int64_t ldo) {
  if (Kw == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * ldo + n] = 0.0f;
    return;
  }
  const int64_t tail_bits = K - 64 * (Kw - 1);
  const uint64_t tail = tail_bits >= 64 ? ~0ULL : (1ULL << tail_bits) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* wr = w + n * Kw;
    const float s = scale ? scale[n * scale_stride] : 1.0f;
    for (int64_t m = 0; m < M; ++m) {
      const uint64_t* ar = a + m * Kw;
      const int64_t pc = xor_popcount_body(ar, wr, Kw - 1) + __builtin_popcountll((ar[Kw - 1] ^ wr[Kw - 1]) & tail);
      out[m * ldo + n] = static_cast<float>(K - 2 * pc) * s;
    }
  }
}

bool binary_wants_nibbles() {
#if defined(QTOOL_ISA_AVX2)
  return true;
#else
  return false;
#endif
}

void pack_sign_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, uint64_t* out, int64_t ldw) {
  pack_sign_rows_impl(x, rows, K, ldx, out, ldw);
}

}  // namespace QTOOL_ISA_NS
}  // namespace cpu
}  // namespace qtool

QTOOL_ISA_END
