// int4 / int3 weight GEMM and per-row int8 quantization, compiled once per ISA (isa.h on x86,
// isa_neon.h on aarch64).
//
// int8 activations: weights are decoded to unsigned codes u = code + offset and multiplied
// with the signed activations (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2).
// offset * sum(a) is subtracted lane by lane in integers, so each group's dot product is exact
// before its scale is applied; with one group per row the result is float(dot) * scale *
// x_scale, bit for bit what the reference computes. NEON decodes signed codes instead (SDOT
// and vmull_s8 are signed x signed), so it needs no offset correction.
// fp32 activations: the weights are code * scale, the reference's dequantized weight to the
// bit (a table of code * scale on AVX-512, one fma or multiplication elsewhere), so only the
// summation order differs from the reference.
//
// Tiles: MR activation rows x NR weight rows share every decoded weight block and every
// activation load; the activation rows left over (all of them in a GEMV) run as 1 x NR1 tiles
// and the last weight rows as 1 x 1 (tile_loop).
#include <algorithm>
#include <cmath>

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

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The 64-value blocks of MR activation rows; the partial last block comes from the
// zero-padded tail copy.
template <typename T, int MR>
struct Rows {
  const T* row[MR];
  const T* tail[MR];
  int64_t full;  // blocks read in place
  inline const T* block(int m, int64_t b) const { return b < full ? row[m] + b * kBlock : tail[m]; }
};

template <typename T, int MR>
inline Rows<T, MR> rows_at(const T* x, const T* x_tail, int64_t ldx, int64_t K, int64_t m0) {
  Rows<T, MR> r;
  r.full = K / kBlock;
  for (int m = 0; m < MR; ++m) {
    r.row[m] = x + (m0 + m) * ldx;
    r.tail[m] = x_tail ? x_tail + (m0 + m) * kBlock : nullptr;
  }
  return r;
}

inline int64_t group_end(const LowbitArgs& A, int64_t g) {
  return imin(ceil_div(A.K, kBlock), (g + 1) * A.group_blocks);
}

#if defined(QTOOL_ISA_AVX512)
// ------------------------------------------------------------------------------- AVX-512
constexpr int kLanes = 16;
constexpr int kMR = 4, kNR = 4;  // int8 tile: 16 accumulators + 4 decoded blocks
constexpr int kNR1 = 8;          // GEMV: 8 weight rows in flight (memory-bound; 4 were 1.6x slower)
constexpr int kMRf = 4, kNRf = 4;

template <int BITS>
inline __m512i decode_u8(const uint8_t* p);

template <>
inline __m512i decode_u8<4>(const uint8_t* p) {
  // Both 256-bit halves hold the 32 bytes; shifting the upper half exposes the high nibbles.
  __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v = _mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4);
  return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
}

template <>
inline __m512i decode_u8<3>(const uint8_t* p) {
  // 128-bit lane t, shifted right by 2t bits, holds u2[16t + j] in byte j; the high-bit plane
  // is a 64-bit mask that adds 4.
  const __m512i shifts = _mm512_set_epi64(0x0006000600060006, 0x0006000600060006,
                                          0x0004000400040004, 0x0004000400040004,
                                          0x0002000200020002, 0x0002000200020002, 0, 0);
  __m512i lo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_and_si512(_mm512_srlv_epi16(lo, shifts), _mm512_set1_epi8(3));
  uint64_t high;
  std::memcpy(&high, p + 16, 8);
  return _mm512_mask_add_epi8(lo, static_cast<__mmask64>(high), lo, _mm512_set1_epi8(4));
}

template <int BITS>
void lane_sums(const LowbitArgs& A, int64_t m0, int64_t m1) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = m0; m < m1; ++m) {
    const Rows<int8_t, 1> rows = rows_at<int8_t, 1>(A.xq, A.xq_tail, A.ldx, A.K, m);
    for (int64_t g = 0; g < A.G; ++g) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t b = g * A.group_blocks; b < group_end(A, g); ++b)
        acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(rows.block(0, b)));
      acc = _mm512_slli_epi32(acc, BITS == 4 ? 3 : 2);  // times the code offset (8 or 4)
      _mm512_storeu_si512(A.lane_sums + (m * A.G + g) * kLanes, acc);
    }
  }
}

template <int BITS, int MR, int NR, bool GROUPED>
void i8_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  const Rows<int8_t, MR> rows = rows_at<int8_t, MR>(A.xq, A.xq_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  float res[MR][NR];
  __m512 facc[MR][NR];
  if constexpr (GROUPED)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) facc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    __m512i acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      __m512i wd[NR];
      for (int r = 0; r < NR; ++r) wd[r] = decode_u8<BITS>(w[r] + b * BB);
      for (int m = 0; m < MR; ++m) {
        const __m512i av = _mm512_loadu_si512(rows.block(m, b));
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], wd[r], av);
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i ls = _mm512_loadu_si512(A.lane_sums + ((m0 + m) * A.G + g) * kLanes);
      for (int r = 0; r < NR; ++r) {
        const __m512i d = _mm512_sub_epi32(acc[m][r], ls);
        if constexpr (GROUPED)
          facc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s[r][g]), facc[m][r]);
        else
          res[m][r] = static_cast<float>(_mm512_reduce_add_epi32(d)) * s[r][0];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      if constexpr (GROUPED) res[m][r] = _mm512_reduce_add_ps(facc[m][r]);
      A.out[(m0 + m) * A.ldo + n0 + r] = res[m][r] * A.x_scale[m0 + m];
    }
}

template <int MR, int NR>
void f32_tile4(const LowbitArgs& A, int64_t m0, int64_t n0) {
  const Rows<float, MR> rows = rows_at<float, MR>(A.x, A.x_tail, A.ldx, A.K, m0);
  const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    __m512 table[NR];
    for (int r = 0; r < NR; ++r) table[r] = _mm512_mul_ps(codes, _mm512_set1_ps(s[r][g]));
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      for (int h = 0; h < 2; ++h) {  // bytes 16h..16h+15: k = 16h + j (low), 32 + 16h + j (high)
        for (int r = 0; r < NR; ++r) {
          const __m512i dw = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + b * 32 + 16 * h)));
          const __m512 lo = _mm512_permutexvar_ps(dw, table[r]);  // uses index bits 0..3
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(dw, 4), table[r]);
          for (int m = 0; m < MR; ++m) {
            const float* a = rows.block(m, b) + 16 * h;
            acc[m][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(a), acc[m][r]);
            acc[m][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(a + 32), acc[m][r]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) A.out[(m0 + m) * A.ldo + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int MR, int NR>
void f32_tile3(const LowbitArgs& A, int64_t m0, int64_t n0) {
  const Rows<float, MR> rows = rows_at<float, MR>(A.x, A.x_tail, A.ldx, A.K, m0);
  // The index holds the two low bits plus two bits of the next field, so the tables repeat
  // every 4 entries; the high-bit plane selects between them.
  const __m512 codes_lo = _mm512_setr_ps(-4, -3, -2, -1, -4, -3, -2, -1, -4, -3, -2, -1, -4, -3, -2, -1);
  const __m512 codes_hi = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    __m512 tlo[NR], thi[NR];
    for (int r = 0; r < NR; ++r) {
      tlo[r] = _mm512_mul_ps(codes_lo, _mm512_set1_ps(s[r][g]));
      thi[r] = _mm512_mul_ps(codes_hi, _mm512_set1_ps(s[r][g]));
    }
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w[r] + b * 24;
        const __m512i dw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        uint64_t high;
        std::memcpy(&high, p + 16, 8);
        for (int t = 0; t < 4; ++t) {  // k = 16t + j
          const __m512i idx = _mm512_srlv_epi32(dw, _mm512_set1_epi32(2 * t));
          const __m512 wv = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(idx, tlo[r]),
                                                       static_cast<__mmask16>(high >> (16 * t)), idx, thi[r]);
          for (int m = 0; m < MR; ++m)
            acc[m][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(rows.block(m, b) + 16 * t), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) A.out[(m0 + m) * A.ldo + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                   float* scale) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 valid = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      peak = _mm512_max_ps(peak, _mm512_and_ps(_mm512_maskz_loadu_ps(valid, xr + k), abs_mask));
    }
    const float amax = _mm512_reduce_max_ps(peak);
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 valid = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(valid, xr + k), sv);
      __m512i c = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
      _mm_mask_storeu_epi8(q + i * ldq + k, valid, _mm512_cvtepi32_epi8(c));
    }
    scale[i] = s;
  }
}

#elif defined(QTOOL_ISA_AVX2)
// ---------------------------------------------------------------------------------- AVX2
constexpr int kLanes = 8;
constexpr int kMR = 3, kNR = 2;
constexpr int kNR1 = 4;  // GEMV: 4 weight rows in flight (i8_row_tile; 8 spill the 16 ymm)
constexpr int kMRf = 4, kNRf = 2;

// Byte i of the result is 4 when bit i of `bits` is set, else 0.
inline __m256i high_bits_to_4(uint32_t bits) {
  const __m256i select = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), select);
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
  return _mm256_and_si256(v, _mm256_set1_epi8(4));
}

// Unsigned codes of one block: lo = k 0..31, hi = k 32..63.
template <int BITS>
inline void decode_u8(const uint8_t* p, __m256i& lo, __m256i& hi) {
  if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i nib = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, nib);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  } else {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i three = _mm256_set1_epi8(3);
    lo = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three);
    hi = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three);
    uint64_t high;
    std::memcpy(&high, p + 16, 8);
    lo = _mm256_add_epi8(lo, high_bits_to_4(static_cast<uint32_t>(high)));
    hi = _mm256_add_epi8(hi, high_bits_to_4(static_cast<uint32_t>(high >> 32)));
  }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Pairs of u8 x s8 products summed to int16 (|sum| <= 2 * 15 * 128, no saturation), the two
// halves of the block added (<= 7680), then widened to int32 lanes.
inline __m256i dot_block(__m256i wlo, __m256i whi, __m256i alo, __m256i ahi) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(wlo, alo), _mm256_maddubs_epi16(whi, ahi));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

template <int BITS>
void lane_sums(const LowbitArgs& A, int64_t m0, int64_t m1) {
  const __m256i ones = _mm256_set1_epi8(1);
  for (int64_t m = m0; m < m1; ++m) {
    const Rows<int8_t, 1> rows = rows_at<int8_t, 1>(A.xq, A.xq_tail, A.ldx, A.K, m);
    for (int64_t g = 0; g < A.G; ++g) {
      __m256i acc = _mm256_setzero_si256();
      for (int64_t b = g * A.group_blocks; b < group_end(A, g); ++b) {
        const int8_t* a = rows.block(0, b);
        acc = _mm256_add_epi32(acc, dot_block(ones, ones, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)),
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32))));
      }
      acc = _mm256_slli_epi32(acc, BITS == 4 ? 3 : 2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(A.lane_sums + (m * A.G + g) * kLanes), acc);
    }
  }
}

// One activation row against NR weight rows (GEMV, and the rows an MR-row tile leaves over).
// Without VNNI the widening vpmaddwd costs as much as the products, so the int16 pair sums of
// kChunk blocks are added first and widened once: |sum| <= kChunk * 2 * (2 * 15 * 128) = 30720
// < 2^15 (u <= 15, a >= -128), exact. NR rows stream at once to keep enough lines in flight.
template <int BITS, int NR, bool GROUPED>
void i8_row_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  constexpr int64_t kChunk = 4;
  const Rows<int8_t, 1> rows = rows_at<int8_t, 1>(A.xq, A.xq_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  // The tiles walk the weights front to back, so prefetching each row `ahead` bytes on covers
  // the memory `ahead` bytes past this tile: at least two tiles, at least 16 KB
  const int64_t ahead = std::max<int64_t>(2 * NR * A.w_row_bytes, 16384);
  float res[NR];
  __m256 facc[NR];
  for (int r = 0; r < NR; ++r) facc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    __m256i acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; b += kChunk) {
      __m256i p[NR];
      for (int r = 0; r < NR; ++r) p[r] = _mm256_setzero_si256();
      auto block = [&](int64_t c) {
        const int8_t* a = rows.block(0, c);
        const __m256i alo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
        const __m256i ahi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
        for (int r = 0; r < NR; ++r) {
          // The next tile's rows, one tile ahead: each row is only K/2 bytes, too short a stream
          // for the hardware prefetcher to lock on (cold int4 GEMV read DRAM at 9 GB/s without)
          _mm_prefetch(reinterpret_cast<const char*>(w[r] + ahead + c * BB), _MM_HINT_T0);
          __m256i lo, hi;
          decode_u8<BITS>(w[r] + c * BB, lo, hi);
          p[r] = _mm256_add_epi16(p[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)));
        }
      };
      if (b + kChunk <= b1)
        for (int64_t c = 0; c < kChunk; ++c) block(b + c);  // constant trip count: unrolled
      else
        for (int64_t c = b; c < b1; ++c) block(c);
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p[r], ones));
    }
    const __m256i ls = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.lane_sums + (m0 * A.G + g) * kLanes));
    for (int r = 0; r < NR; ++r) {
      const __m256i d = _mm256_sub_epi32(acc[r], ls);
      if constexpr (GROUPED)
        facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s[r][g]), facc[r]);
      else
        res[r] = static_cast<float>(hsum_epi32(d)) * s[r][0];
    }
  }
  for (int r = 0; r < NR; ++r) {
    if constexpr (GROUPED) res[r] = hsum_ps(facc[r]);
    A.out[m0 * A.ldo + n0 + r] = res[r] * A.x_scale[m0];
  }
}

template <int BITS, int MR, int NR, bool GROUPED>
void i8_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  if constexpr (MR == 1 && NR > 1) {
    i8_row_tile<BITS, NR, GROUPED>(A, m0, n0);
    return;
  }
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  const Rows<int8_t, MR> rows = rows_at<int8_t, MR>(A.xq, A.xq_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  float res[MR][NR];
  __m256 facc[MR][NR];
  if constexpr (GROUPED)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) facc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < A.G; ++g) {
    __m256i acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      __m256i wlo[NR], whi[NR];
      for (int r = 0; r < NR; ++r) decode_u8<BITS>(w[r] + b * BB, wlo[r], whi[r]);
      for (int m = 0; m < MR; ++m) {
        const int8_t* a = rows.block(m, b);
        const __m256i alo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
        const __m256i ahi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_add_epi32(acc[m][r], dot_block(wlo[r], whi[r], alo, ahi));
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m256i ls = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(A.lane_sums + ((m0 + m) * A.G + g) * kLanes));
      for (int r = 0; r < NR; ++r) {
        const __m256i d = _mm256_sub_epi32(acc[m][r], ls);
        if constexpr (GROUPED)
          facc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s[r][g]), facc[m][r]);
        else
          res[m][r] = static_cast<float>(hsum_epi32(d)) * s[r][0];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      if constexpr (GROUPED) res[m][r] = hsum_ps(facc[m][r]);
      A.out[(m0 + m) * A.ldo + n0 + r] = res[m][r] * A.x_scale[m0 + m];
    }
}

// fp32 activations: each weight block is decoded to bytes once, then each group of 8 codes
// becomes u * s - offset * s in one fma, exactly code * s (offset * s is exact: a power of two).
template <int BITS, int MR, int NR>
void f32_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  constexpr float kOffset = BITS == 4 ? 8.0f : 4.0f;
  const Rows<float, MR> rows = rows_at<float, MR>(A.x, A.x_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  alignas(32) uint8_t u[NR][kBlock];
  for (int64_t g = 0; g < A.G; ++g) {
    __m256 sv[NR], bias[NR];
    for (int r = 0; r < NR; ++r) {
      sv[r] = _mm256_set1_ps(s[r][g]);
      bias[r] = _mm256_set1_ps(-kOffset * s[r][g]);
    }
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      for (int r = 0; r < NR; ++r) {
        __m256i lo, hi;
        decode_u8<BITS>(w[r] + b * BB, lo, hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(u[r]), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(u[r] + 32), hi);
      }
      for (int i = 0; i < 8; ++i) {
        for (int r = 0; r < NR; ++r) {
          const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u[r] + 8 * i)));
          const __m256 wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), sv[r], bias[r]);
          for (int m = 0; m < MR; ++m)
            acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(rows.block(m, b) + 8 * i), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) A.out[(m0 + m) * A.ldo + n0 + r] = hsum_ps(acc[m][r]);
}

template <int MR, int NR>
void f32_tile4(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<4, MR, NR>(A, m0, n0); }
template <int MR, int NR>
void f32_tile3(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<3, MR, NR>(A, m0, n0); }

void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                   float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    int8_t* qr = q + i * ldq;
    __m256 peak = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) peak = _mm256_max_ps(peak, _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask));
    __m128 p = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
    p = _mm_max_ps(p, _mm_movehl_ps(p, p));
    p = _mm_max_ss(p, _mm_movehdup_ps(p));
    float amax = _mm_cvtss_f32(p);
    for (; k < K; ++k) amax = std::fabs(xr[k]) > amax ? std::fabs(xr[k]) : amax;
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m256 sv = _mm256_set1_ps(s);
    alignas(32) int32_t c[8];
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256i ci = _mm256_cvtps_epi32(v);
      ci = _mm256_min_epi32(_mm256_max_epi32(ci, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
      _mm256_store_si256(reinterpret_cast<__m256i*>(c), ci);
      for (int j = 0; j < 8; ++j) qr[k + j] = static_cast<int8_t>(c[j]);
    }
    for (; k < K; ++k) {
      const float v = std::nearbyint(xr[k] / s);
      qr[k] = static_cast<int8_t>(v > 127.0f ? 127 : (v < -127.0f ? -127 : v));
    }
    scale[i] = s;
  }
}

#elif defined(QTOOL_ISA_NEON)
// ---------------------------------------------------------------------------------- NEON
// Codes are decoded to signed bytes (code = u - offset) and multiplied with the signed
// activations, so every int32 lane holds an exact signed sum and no lane sums are needed:
// SDOT (vdotq_s32) in the dot-product build, vmull_s8 + vpadalq_s16 in the baseline one.
// Group results are added in the reference's order (float(dot) * scale, group by group).
constexpr int kLanes = 0;
constexpr int kMR = 4, kNR = 2, kNR1 = 4;  // 8 accumulators + 8 decoded vectors (of 32)
constexpr int kMRf = 4, kNRf = 2;

// The 64 signed codes of one block: c[q] holds k = 16q .. 16q + 15.
template <int BITS>
inline void decode_s8(const uint8_t* p, int8x16_t c[4]) {
  if constexpr (BITS == 4) {
    const uint8x16_t v0 = vld1q_u8(p), v1 = vld1q_u8(p + 16), nib = vdupq_n_u8(0x0F);
    const uint8x16_t u[4] = {vandq_u8(v0, nib), vandq_u8(v1, nib), vshrq_n_u8(v0, 4), vshrq_n_u8(v1, 4)};
    for (int q = 0; q < 4; ++q) c[q] = vsubq_s8(vreinterpretq_s8_u8(u[q]), vdupq_n_s8(8));
  } else {
    // Byte j of the 2-bit plane holds u2[j], u2[j+16], u2[j+32], u2[j+48]; the high plane's
    // bytes 2q, 2q+1 hold bit 2 of k = 16q .. 16q + 15, spread to bytes by a table lookup.
    const uint8x16_t v = vld1q_u8(p), three = vdupq_n_u8(3);
    const uint8x16_t low[4] = {vandq_u8(v, three), vandq_u8(vshrq_n_u8(v, 2), three),
                               vandq_u8(vshrq_n_u8(v, 4), three), vshrq_n_u8(v, 6)};
    const uint8x8_t h = vld1_u8(p + 16);
    const uint8x16_t hh = vcombine_u8(h, h);
    const uint8x16_t bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    for (int q = 0; q < 4; ++q) {
      const uint8x16_t index = vcombine_u8(vdup_n_u8(static_cast<uint8_t>(2 * q)), vdup_n_u8(static_cast<uint8_t>(2 * q + 1)));
      const uint8x16_t four = vandq_u8(vtstq_u8(vqtbl1q_u8(hh, index), bit), vdupq_n_u8(4));
      c[q] = vsubq_s8(vreinterpretq_s8_u8(vaddq_u8(low[q], four)), vdupq_n_s8(4));
    }
  }
}

// acc + the 16 products w[j] * a[j], summed into 4 lanes (|w| <= 8, |a| <= 128).
inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t a) {
#if defined(QTOOL_ISA_NEONDOT)
  return vdotq_s32(acc, w, a);
#else
  // int16 pair sums: |sum| <= 2 * 8 * 128, no overflow
  return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(a)), w, a));
#endif
}

template <int BITS>
void lane_sums(const LowbitArgs&, int64_t, int64_t) {}

template <int BITS, int MR, int NR, bool GROUPED>
void i8_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  const Rows<int8_t, MR> rows = rows_at<int8_t, MR>(A.xq, A.xq_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  float res[MR][NR] = {};
  for (int64_t g = 0; g < A.G; ++g) {
    int32x4_t acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = vdupq_n_s32(0);
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      int8x16_t wc[NR][4];
      for (int r = 0; r < NR; ++r) decode_s8<BITS>(w[r] + b * BB, wc[r]);
      for (int m = 0; m < MR; ++m) {
        const int8_t* a = rows.block(m, b);
        for (int q = 0; q < 4; ++q) {
          const int8x16_t av = vld1q_s8(a + 16 * q);
          for (int r = 0; r < NR; ++r) acc[m][r] = dot16(acc[m][r], wc[r][q], av);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) {
        const float term = static_cast<float>(vaddvq_s32(acc[m][r])) * s[r][g];
        res[m][r] = g == 0 ? term : res[m][r] + term;
      }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) A.out[(m0 + m) * A.ldo + n0 + r] = res[m][r] * A.x_scale[m0 + m];
}

// fp32 activations: code * scale in one multiplication, the reference's dequantized weight.
template <int BITS, int MR, int NR>
void f32_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  constexpr int64_t BB = BITS == 4 ? 32 : 24;
  const Rows<float, MR> rows = rows_at<float, MR>(A.x, A.x_tail, A.ldx, A.K, m0);
  const uint8_t* w[NR];
  const float* s[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = A.w + (n0 + r) * A.w_row_bytes;
    s[r] = A.scale + (n0 + r) * A.G;
  }
  float32x4_t acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < A.G; ++g) {
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      for (int r = 0; r < NR; ++r) {
        int8x16_t c[4];
        decode_s8<BITS>(w[r] + b * BB, c);
        for (int q = 0; q < 4; ++q) {
          const int16x8_t lo = vmovl_s8(vget_low_s8(c[q])), hi = vmovl_high_s8(c[q]);
          const int32x4_t ci[4] = {vmovl_s16(vget_low_s16(lo)), vmovl_high_s16(lo), vmovl_s16(vget_low_s16(hi)),
                                   vmovl_high_s16(hi)};
          for (int i = 0; i < 4; ++i) {
            const float32x4_t wv = vmulq_n_f32(vcvtq_f32_s32(ci[i]), s[r][g]);
            for (int m = 0; m < MR; ++m)
              acc[m][r] = vfmaq_f32(acc[m][r], wv, vld1q_f32(rows.block(m, b) + 16 * q + 4 * i));
          }
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) A.out[(m0 + m) * A.ldo + n0 + r] = vaddvq_f32(acc[m][r]);
}

template <int MR, int NR>
void f32_tile4(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<4, MR, NR>(A, m0, n0); }
template <int MR, int NR>
void f32_tile3(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<3, MR, NR>(A, m0, n0); }

void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                   float* scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    int8_t* qr = q + i * ldq;
    float32x4_t peak = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) peak = vmaxq_f32(peak, vabsq_f32(vld1q_f32(xr + k)));
    float amax = vmaxvq_f32(peak);
    for (; k < K; ++k) amax = std::fabs(xr[k]) > amax ? std::fabs(xr[k]) : amax;
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float32x4_t sv = vdupq_n_f32(s);
    const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
    for (k = 0; k + 8 <= K; k += 8) {
      // x / s rounded half to even (vrndnq), as torch.round; the clamp only matters for x = amax
      int32x4_t c[2];
      for (int h = 0; h < 2; ++h)
        c[h] = vminq_s32(vmaxq_s32(vcvtq_s32_f32(vrndnq_f32(vdivq_f32(vld1q_f32(xr + k + 4 * h), sv))), lo), hi);
      vst1_s8(qr + k, vmovn_s16(vcombine_s16(vmovn_s32(c[0]), vmovn_s32(c[1]))));
    }
    for (; k < K; ++k) {
      const float v = std::nearbyint(xr[k] / s);
      qr[k] = static_cast<int8_t>(v > 127.0f ? 127 : (v < -127.0f ? -127 : v));
    }
    scale[i] = s;
  }
}

#else
// -------------------------------------------------------------------------------- scalar
constexpr int kLanes = 0;  // exact signed dot products: no offset to subtract
constexpr int kMR = 1, kNR = 1, kNR1 = 1;
constexpr int kMRf = 1, kNRf = 1;

template <int BITS>
void lane_sums(const LowbitArgs&, int64_t, int64_t) {}

template <int BITS, int MR, int NR, bool GROUPED>
void i8_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  const Rows<int8_t, 1> rows = rows_at<int8_t, 1>(A.xq, A.xq_tail, A.ldx, A.K, m0);
  const uint8_t* w = A.w + n0 * A.w_row_bytes;
  const float* s = A.scale + n0 * A.G;
  int8_t codes[kBlock];
  float res = 0.0f;
  for (int64_t g = 0; g < A.G; ++g) {
    int64_t dot = 0;
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      decode_block(BITS, w + b * block_bytes(BITS), codes);
      const int8_t* a = rows.block(0, b);
      for (int j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(a[j]) * codes[j];
    }
    res = g == 0 ? static_cast<float>(dot) * s[0] : res + static_cast<float>(dot) * s[g];
  }
  A.out[m0 * A.ldo + n0] = res * A.x_scale[m0];
}

template <int BITS, int MR, int NR>
void f32_tile(const LowbitArgs& A, int64_t m0, int64_t n0) {
  const Rows<float, 1> rows = rows_at<float, 1>(A.x, A.x_tail, A.ldx, A.K, m0);
  const uint8_t* w = A.w + n0 * A.w_row_bytes;
  int8_t codes[kBlock];
  float acc = 0.0f;
  for (int64_t g = 0; g < A.G; ++g) {
    const float s = A.scale[n0 * A.G + g];
    for (int64_t b = g * A.group_blocks, b1 = group_end(A, g); b < b1; ++b) {
      decode_block(BITS, w + b * block_bytes(BITS), codes);
      const float* a = rows.block(0, b);
      for (int j = 0; j < kBlock; ++j) acc += a[j] * (static_cast<float>(codes[j]) * s);
    }
  }
  A.out[m0 * A.ldo + n0] = acc;
}

template <int MR, int NR>
void f32_tile4(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<4, MR, NR>(A, m0, n0); }
template <int MR, int NR>
void f32_tile3(const LowbitArgs& A, int64_t m0, int64_t n0) { f32_tile<3, MR, NR>(A, m0, n0); }

void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                   float* scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::fabs(xr[k]) > amax ? std::fabs(xr[k]) : amax;
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(xr[k] / s);
      q[i * ldq + k] = static_cast<int8_t>(v > 127.0f ? 127 : (v < -127.0f ? -127 : v));
    }
    scale[i] = s;
  }
}
#endif

// Walks weight rows [n0, n1) in steps of NR1 rows: MR x NR tiles for the activation rows
// that fill whole MR-row tiles, then 1 x NR1 tiles for the rest (all rows of a GEMV), so each
// weight row is read once while it is in cache; the last n1 % NR1 weight rows run as 1 x 1.
template <int MR, int NR, int NR1, typename Tile>
void tile_loop(const LowbitArgs& A, int64_t n0, int64_t n1) {
  static_assert(NR1 % NR == 0, "the single-row tile covers whole MR x NR tiles");
  const int64_t mfull = A.M - A.M % MR;
  int64_t n = n0;
  for (; n + NR1 <= n1; n += NR1) {
    for (int64_t j = n; j < n + NR1; j += NR)
      for (int64_t m = 0; m < mfull; m += MR) Tile::template run<MR, NR>(A, m, j);
    for (int64_t m = mfull; m < A.M; ++m) Tile::template run<1, NR1>(A, m, n);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < A.M; ++m) Tile::template run<1, 1>(A, m, n);
}

template <int BITS, bool GROUPED>
struct I8Tile {
  template <int MR, int NR>
  static void run(const LowbitArgs& A, int64_t m, int64_t n) { i8_tile<BITS, MR, NR, GROUPED>(A, m, n); }
};

template <int BITS>
struct F32Tile {
  template <int MR, int NR>
  static void run(const LowbitArgs& A, int64_t m, int64_t n) {
    if constexpr (BITS == 4)
      f32_tile4<MR, NR>(A, m, n);
    else
      f32_tile3<MR, NR>(A, m, n);
  }
};

}  // namespace

int lowbit_lanes() { return kLanes; }

void lowbit_lane_sums(const LowbitArgs& A, int64_t m0, int64_t m1) {
  if (A.bits == 4)
    lane_sums<4>(A, m0, m1);
  else
    lane_sums<3>(A, m0, m1);
}

void lowbit_i8(const LowbitArgs& A, int64_t n0, int64_t n1) {
  const bool grouped = A.G > 1;
  if (A.bits == 4)
    grouped ? tile_loop<kMR, kNR, kNR1, I8Tile<4, true>>(A, n0, n1) : tile_loop<kMR, kNR, kNR1, I8Tile<4, false>>(A, n0, n1);
  else
    grouped ? tile_loop<kMR, kNR, kNR1, I8Tile<3, true>>(A, n0, n1) : tile_loop<kMR, kNR, kNR1, I8Tile<3, false>>(A, n0, n1);
}

void lowbit_f32(const LowbitArgs& A, int64_t n0, int64_t n1) {
  if (A.bits == 4)
    tile_loop<kMRf, kNRf, kNRf, F32Tile<4>>(A, n0, n1);
  else
    tile_loop<kMRf, kNRf, kNRf, F32Tile<3>>(A, n0, n1);
}

void quantize_rows_i8(const float* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                      float* scale) {
  quantize_rows(x, rows, K, ldx, q, ldq, scale);
}

}  // namespace QTOOL_ISA_NS
}  // namespace cpu
}  // namespace qtool

QTOOL_ISA_END
