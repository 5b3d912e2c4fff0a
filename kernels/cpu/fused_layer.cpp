// qtool::fused_conv2d and qtool::fused_linear: one quantized conv/linear layer of a graph-prepared
// model in integers, from its input's codes to the next tensor quantizer's codes, in one pass.
//
//   acc = sum_k x_code[k] * w_code[n][k]                        exact, int32
//   T   = float32(acc + bias_code[n])                           the int -> float conversion
//   y   = T * unit[n]                                           float32
//     or, with a multiplier (requantization as QLinearConv does it: multiplier[n] is
//     float32(unit[n] / out_step)):  y = rint(T * multiplier[n]) * out_step
//   y   = clamp(y, clamp[0], clamp[1])                          ReLU / ReLU6 / Hardtanh after the layer
//   q   = rint(clamp(y / out_step, out_range))                  the tensor quantizer after it
// and, with residual codes r (the other operand of an add), the add as onnxruntime's QLinearAdd
// computes it on uint8-container codes (signed grids offset by 128: za, zr, zc), a its first
// operand (q + za, or r + zr with residual_first), b the other:
//   u   = rint(fma(a, ra, fma(b, rb, fixed)))  clamped to [0, 255]   ra = float32(step_a / add_step),
//         fixed = zc - (ra * za + rb * zb); each fma a float64 multiply-add rounded to float32
//   z   = clamp((u - zc) * add_step, add_clamp)                  the model's IntegerAdd, then a clamp
//   q   = rint(clamp(z / add_step, add_range))                  the quantizer after the add
// out_step == 0 returns y as float32 (the logits). rint is round half to even. Each float step is
// one IEEE operation in the order of the graph-prepared model's eval forward
// (qtool.quant.integer.deployed_output: the codes summed exactly, converted to float32, times
// unit, or requantized with the multiplier when the graph passes the layer its output step), then
// LSQ's x / s, clamp, round and the add (qtool.quant.integer.IntegerAdd), so the op gives the
// model's codes and logits bit for bit. The reference (qtool/lowbit/fused_reference.py) computes
// the same numbers. FP contraction is off in this file: every multiply-add rounds as written.
//
// Codes: int8 for a signed grid, uint8 for an unsigned one (every LSQ grid up to 8 bits).
// Two GEMMs, both exact in int32:
// - bits 3/4, packed weights (kernels/include/qtool_kernels.h): the library's int4/int3 tiles
//   (lowbit.cpp) through the dispatched kernel table; with unit scales lowbit_i8 returns
//   float(dot), exact below 2^24. int8 input codes. They reduce K inside the vector lanes: made for
//   long rows (GEMV, memory-bound weights), not for narrow convolutions.
// - bits 8, int8 weight codes in "lanes" panels [ceil(N/16)][ceil(K/4)][16][4]: 16 output
//   channels in the vector lanes, 4 consecutive k per 32-bit lane, so an activation word is
//   broadcast against a panel row and no horizontal sums are needed: vpdpbusd (AVX-512 VNNI),
//   vpmaddubsw + vpmaddwd (AVX2; int16 pair sums <= 2 * 255 * 64 when |w| <= 64, checked, else the
//   scalar tile), scalar. Activations are unsigned bytes: uint8 codes as they are, int8 codes
//   offset by 128 (x ^ 0x80), whose 128 * sum_k w[n][k] is subtracted from the bias (padding is
//   code 0 either way, so the correction covers every tap). Conv patches are read in place from
//   the zero-padded input when kw * C is a multiple of 4 (kh runs of kw * C bytes), else gathered.
// The ISA is the kernel table's (QTOOL_KERNEL_ISA, ops.set_isa); the epilogue and the lanes tiles
// are compiled here for AVX-512, AVX2 and baseline and follow the same choice.
//
// Layout: conv codes are logical [N, C, H, W] in channels-last memory (made so), so one output
// pixel's channels are contiguous, a GEMM row; K runs (tap row, tap column, channel), the order
// of the weight rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "qtool_kernels.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define QTOOL_FUSED_X86 1
#include <immintrin.h>
#define QTOOL_TARGET_AVX512 \
  __attribute__((target("avx,avx2,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define QTOOL_TARGET_AVX2 __attribute__((target("avx,avx2,bmi,bmi2,popcnt")))
#endif
#define QTOOL_INLINE inline __attribute__((always_inline))

namespace qtool {
namespace {

using at::Tensor;

constexpr int64_t kLanes = 16;   // output channels per lanes panel
constexpr int64_t kChunk = 96;   // GEMM rows per task: a multiple of every tile's MR (12, 4)
constexpr int kMaxMR = 12;

// ------------------------------------------------------------------------------ epilogue
struct Epilogue {
  bool multiplier;       // `unit` holds float32(unit / out_step): requantize with it
  float lo, hi;          // clamp of y
  bool float_out;        // return y
  float s1, q1lo, q1hi;  // quantizer after the layer
  bool residual;
  bool residual_first;   // the residual is QLinearAdd's first operand
  float zq, zr, zc;      // container zero points: the layer's codes, the residual's, the sum's
  float ra, rb, fixed;   // QLinearAdd's constants (a: the first operand)
  float lo2, hi2;        // clamp after the add
  float s2, q2lo, q2hi;  // quantizer after the add
};

// Round half to even for |v| < 2^22 (clamped codes): adding and subtracting 1.5 * 2^23 leaves no
// fraction bits under the default rounding mode, as torch.round and LSQ's kernel do. Plain
// arithmetic, so the loops vectorize.
QTOOL_INLINE float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

QTOOL_INLINE float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Accumulators come as float (lowbit_i8's exact float(dot)) or int32 (lanes tiles); acc + bias is
// exact in float64, and float64 -> float32 rounds it as the direct integer conversion does.
template <typename Acc>
QTOOL_INLINE float acc_plus_bias(Acc a, int32_t b) {
  return static_cast<float>(static_cast<double>(a) + static_cast<double>(b));
}

// rint for any float: beyond 2^22 in magnitude the value saturates every grid the clamps that
// follow allow (|codes| <= 255), so clamping it there first changes no result.
QTOOL_INLINE float rint_any(float v) { return round_half_even(clampf(v, -4194304.0f, 4194304.0f)); }

// fma(a, b, c) of float32 values: exact in float64 for an 8-bit code times a float32 ratio plus a
// float32 addend of a similar scale (qtool.quant.integer.qlinear_add_codes), then rounded once.
QTOOL_INLINE float fma_f32(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
}

// `count` outputs laid out as rows of N channels, bias and unit (or multiplier) tiled to the same
// length: one flat loop, vectorized whatever N is.
template <typename Acc, typename Res, typename Out, bool RES, bool FLOAT_OUT, bool MULT>
QTOOL_INLINE void epilogue_flat(const Acc* __restrict acc, const int32_t* __restrict bias,
                                const float* __restrict unit, int64_t count, const Epilogue& e,
                                const Res* __restrict res, Out* __restrict out) {
  const float lo = e.lo, hi = e.hi, s1 = e.s1, q1lo = e.q1lo, q1hi = e.q1hi;
  const float lo2 = e.lo2, hi2 = e.hi2, s2 = e.s2, q2lo = e.q2lo, q2hi = e.q2hi;
  const float zq = e.zq, zr = e.zr, zc = e.zc, ra = e.ra, rb = e.rb, fixed = e.fixed;
  const float swap = e.residual_first ? 1.0f : 0.0f;  // arithmetic, not a select: the loop stays vectorized
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float t = acc_plus_bias(acc[i], bias[i]);
    float y;
    if constexpr (MULT)
      y = rint_any(t * unit[i]) * s1;
    else
      y = t * unit[i];
    y = clampf(y, lo, hi);
    if constexpr (FLOAT_OUT) {
      out[i] = y;
    } else {
      float q = round_half_even(clampf(y / s1, q1lo, q1hi));
      if constexpr (RES) {
        const float mine = q + zq, other = static_cast<float>(res[i]) + zr;
        const float a = mine + swap * (other - mine), b = other + swap * (mine - other);  // exact: small integers
        const float u = clampf(rint_any(fma_f32(a, ra, fma_f32(b, rb, fixed))), 0.0f, 255.0f);
        q = round_half_even(clampf(clampf((u - zc) * s2, lo2, hi2) / s2, q2lo, q2hi));
      }
      out[i] = static_cast<Out>(static_cast<int32_t>(q));
    }
  }
}

// Rows of accumulators (row stride ld_acc) through the epilogue into rows of N outputs.
struct EpilogueRows {
  const void* acc;
  int64_t ld_acc;
  const int32_t* bias;  // tiled: [rows][N] when ld_acc == N, else [N]
  const float* unit;
  int64_t rows, N;
  const void* res;      // [rows][N] or null
  void* out;            // [rows][N]
};

template <typename Acc, typename Res, typename Out, bool RES, bool FLOAT_OUT, bool MULT>
QTOOL_INLINE void epilogue_rows(const EpilogueRows& r, const Epilogue& e) {
  const Acc* acc = static_cast<const Acc*>(r.acc);
  const Res* res = static_cast<const Res*>(r.res);
  Out* out = static_cast<Out*>(r.out);
  if (r.ld_acc == r.N) {
    epilogue_flat<Acc, Res, Out, RES, FLOAT_OUT, MULT>(acc, r.bias, r.unit, r.rows * r.N, e, res, out);
    return;
  }
  for (int64_t m = 0; m < r.rows; ++m)
    epilogue_flat<Acc, Res, Out, RES, FLOAT_OUT, MULT>(acc + m * r.ld_acc, r.bias, r.unit, r.N, e,
                                                       RES ? res + m * r.N : nullptr, out + m * r.N);
}

// ---------------------------------------------------------------------------- lanes tiles
// MR rows of the GEMM against the lanes panels. Row r reads its K as S segments of L4 4-byte
// words at base[r] + seg_off[s] (kh tap rows read in place, or one gathered row); rows past the
// real ones point at zeros and write to scratch rows of acc.
struct LaneTile {
  const uint8_t* base[kMaxMR];
  const int64_t* seg_off;
  int64_t S, L4, K4;
  const int8_t* panels;  // [P][K4][16][4]
  int64_t P;
  int32_t* acc;          // [MR][ld], ld >= 16 P
  int64_t ld;
};

QTOOL_INLINE int32_t load_word(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MR>
QTOOL_INLINE void lanes_tile_base(const LaneTile& t) {
  for (int64_t p = 0; p < t.P; ++p) {
    int32_t acc[MR][kLanes] = {};
    const int8_t* w = t.panels + p * t.K4 * 64;
    for (int64_t s = 0; s < t.S; ++s)
      for (int64_t j = 0; j < t.L4; ++j) {
        const int8_t* wj = w + (s * t.L4 + j) * 64;
        for (int r = 0; r < MR; ++r) {
          const uint8_t* a = t.base[r] + t.seg_off[s] + 4 * j;
          for (int c = 0; c < kLanes; ++c)
            acc[r][c] += a[0] * wj[4 * c] + a[1] * wj[4 * c + 1] + a[2] * wj[4 * c + 2] + a[3] * wj[4 * c + 3];
        }
      }
    for (int r = 0; r < MR; ++r) std::memcpy(t.acc + r * t.ld + p * kLanes, acc[r], sizeof(acc[r]));
  }
}

#if defined(QTOOL_FUSED_X86)
// MR rows x PP panels of accumulators (12 x 2 = 24 of the 32 zmm registers).
template <int MR, int PP>
QTOOL_TARGET_AVX512 QTOOL_INLINE void lanes_panels_avx512(const LaneTile& t, int64_t p0) {
  __m512i acc[MR][PP];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < PP; ++q) acc[r][q] = _mm512_setzero_si512();
  const int8_t* w = t.panels + p0 * t.K4 * 64;
  for (int64_t s = 0; s < t.S; ++s) {
    const uint8_t* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = t.base[r] + t.seg_off[s];
    const int8_t* ws = w + s * t.L4 * 64;
    for (int64_t j = 0; j < t.L4; ++j) {
      __m512i wv[PP];
      for (int q = 0; q < PP; ++q) wv[q] = _mm512_loadu_si512(ws + q * t.K4 * 64 + j * 64);
      for (int r = 0; r < MR; ++r) {
        const __m512i av = _mm512_set1_epi32(load_word(a[r] + 4 * j));
        for (int q = 0; q < PP; ++q) acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], av, wv[q]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < PP; ++q) _mm512_storeu_si512(t.acc + r * t.ld + (p0 + q) * kLanes, acc[r][q]);
}

QTOOL_TARGET_AVX512 void lanes_tile_avx512(const LaneTile& t) {
  int64_t p = 0;
  for (; p + 2 <= t.P; p += 2) lanes_panels_avx512<12, 2>(t, p);
  if (p < t.P) lanes_panels_avx512<12, 1>(t, p);
}

// 4 rows x 16 channels (two ymm per row); |w| <= 64 keeps vpmaddubsw's int16 pair sums exact.
QTOOL_TARGET_AVX2 void lanes_tile_avx2(const LaneTile& t) {
  constexpr int MR = 4;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t p = 0; p < t.P; ++p) {
    __m256i acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int8_t* w = t.panels + p * t.K4 * 64;
    for (int64_t s = 0; s < t.S; ++s) {
      const uint8_t* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = t.base[r] + t.seg_off[s];
      const int8_t* ws = w + s * t.L4 * 64;
      for (int64_t j = 0; j < t.L4; ++j) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + j * 64));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + j * 64 + 32));
        for (int r = 0; r < MR; ++r) {
          const __m256i av = _mm256_set1_epi32(load_word(a[r] + 4 * j));
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones));
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.acc + r * t.ld + p * kLanes), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.acc + r * t.ld + p * kLanes + 8), acc[r][1]);
    }
  }
}
#endif

// ------------------------------------------------------------- one copy per ISA, and dispatch
using EpilogueFn = void (*)(const EpilogueRows&, const Epilogue&);
using LanesFn = void (*)(const LaneTile&);

#define QTOOL_FUSED_ISA(NS, TARGET)                                                        \
  namespace NS {                                                                           \
  template <typename Acc, typename Res, typename Out, bool RES, bool FLOAT_OUT, bool MULT>  \
  TARGET void epilogue(const EpilogueRows& r, const Epilogue& e) {                         \
    epilogue_rows<Acc, Res, Out, RES, FLOAT_OUT, MULT>(r, e);                              \
  }                                                                                        \
  template <typename Acc, typename Res, typename Out, bool RES, bool FLOAT_OUT, bool MULT>  \
  EpilogueFn pick() {                                                                      \
    return &epilogue<Acc, Res, Out, RES, FLOAT_OUT, MULT>;                                 \
  }                                                                                        \
  }

QTOOL_FUSED_ISA(base, )
#if defined(QTOOL_FUSED_X86)
QTOOL_FUSED_ISA(avx2, QTOOL_TARGET_AVX2)
QTOOL_FUSED_ISA(avx512, QTOOL_TARGET_AVX512)
#endif

void lanes_tile_scalar(const LaneTile& t) { lanes_tile_base<4>(t); }

enum class Isa { kBase, kAvx2, kAvx512 };

// The ISA of the kernel table in use (the library's choice).
Isa current_isa() {
#if defined(QTOOL_FUSED_X86)
  const std::string name = cpu::kernels().name;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
#endif
  return Isa::kBase;
}

template <typename Acc, typename Res, typename Out, bool RES, bool FLOAT_OUT, bool MULT>
EpilogueFn epilogue_for(Isa isa) {
#if defined(QTOOL_FUSED_X86)
  if (isa == Isa::kAvx512) return avx512::pick<Acc, Res, Out, RES, FLOAT_OUT, MULT>();
  if (isa == Isa::kAvx2) return avx2::pick<Acc, Res, Out, RES, FLOAT_OUT, MULT>();
#endif
  return base::pick<Acc, Res, Out, RES, FLOAT_OUT, MULT>();
}

template <typename Acc, typename Out, bool MULT>
EpilogueFn epilogue_for_res(Isa isa, bool has_res, at::ScalarType res) {
  if (!has_res) return epilogue_for<Acc, uint8_t, Out, false, false, MULT>(isa);
  return res == at::kChar ? epilogue_for<Acc, int8_t, Out, true, false, MULT>(isa)
                          : epilogue_for<Acc, uint8_t, Out, true, false, MULT>(isa);
}

template <typename Acc, bool MULT>
EpilogueFn epilogue_for_out(Isa isa, bool has_res, at::ScalarType res, at::ScalarType out) {
  return out == at::kChar ? epilogue_for_res<Acc, int8_t, MULT>(isa, has_res, res)
                          : epilogue_for_res<Acc, uint8_t, MULT>(isa, has_res, res);
}

template <typename Acc>
EpilogueFn select_epilogue(Isa isa, const Epilogue& e, bool has_res, at::ScalarType res, at::ScalarType out) {
  if (out == at::kFloat) return epilogue_for<Acc, uint8_t, float, false, true, false>(isa);
  return e.multiplier ? epilogue_for_out<Acc, true>(isa, has_res, res, out)
                      : epilogue_for_out<Acc, false>(isa, has_res, res, out);
}

// ------------------------------------------------------------------------------- inputs
QTOOL_INLINE void copy_bytes(uint8_t* d, const uint8_t* s, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) std::memcpy(d + i, s + i, 16);
  if (i + 8 <= n) {
    std::memcpy(d + i, s + i, 8);
    i += 8;
  }
  for (; i < n; ++i) d[i] = s[i];
}

// Channels-last [N, H, W, C] bytes with a border of (ph, pw) filled with `zero`; `flip` XORs
// every byte with 0x80 (int8 codes to unsigned, offset by 128). The input itself when neither
// is needed.
Tensor padded_bytes(const Tensor& x, int64_t ph, int64_t pw, bool flip) {
  if (ph == 0 && pw == 0 && !flip) return x;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * ph, Wp = W + 2 * pw;
  Tensor out = at::empty({N, Hp, Wp, C}, x.options().dtype(at::kByte));
  const uint8_t* src = static_cast<const uint8_t*>(x.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t zero = flip ? 0x80 : 0;
  at::parallel_for(0, N * Hp, 16, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / Hp, h = row % Hp - ph;
      uint8_t* d = dst + row * Wp * C;
      if (h < 0 || h >= H) {
        std::memset(d, zero, Wp * C);
        continue;
      }
      std::memset(d, zero, pw * C);
      std::memset(d + (pw + W) * C, zero, pw * C);
      const uint8_t* s = src + (n * H + h) * W * C;
      if (flip)
        for (int64_t i = 0; i < W * C; ++i) d[pw * C + i] = s[i] ^ 0x80;
      else
        std::memcpy(d + pw * C, s, W * C);
    }
  });
  return out;
}

// Output pixel coordinates advanced row by row.
struct PixelCursor {
  int64_t n, oh, ow, OH, OW;
  PixelCursor(int64_t m, int64_t OH_, int64_t OW_)
      : n(m / (OH_ * OW_)), oh((m / OW_) % OH_), ow(m % OW_), OH(OH_), OW(OW_) {}
  void next() {
    if (++ow == OW) {
      ow = 0;
      if (++oh == OH) {
        oh = 0;
        ++n;
      }
    }
  }
};

struct ConvShape {
  int64_t N, C, H, W, Hp, Wp, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
  // first byte of output pixel (n, oh, ow)'s window in the padded input
  int64_t origin(const PixelCursor& c) const { return ((c.n * Hp + c.oh * sh) * Wp + c.ow * sw) * C; }
};

// Rows [m0, m0 + rows) of patches from the padded bytes into dst (row stride ld, bytes past K
// untouched).
void gather_patches(const ConvShape& g, const uint8_t* padded, int64_t m0, int64_t rows, uint8_t* dst, int64_t ld) {
  PixelCursor cur(m0, g.OH, g.OW);
  const int64_t run = g.dw == 1 ? g.kw * g.C : g.C;
  for (int64_t r = 0; r < rows; ++r, cur.next()) {
    uint8_t* out = dst + r * ld;
    const uint8_t* origin = padded + g.origin(cur);
    for (int64_t i = 0; i < g.kh; ++i) {
      const uint8_t* src = origin + i * g.dh * g.Wp * g.C;
      if (g.dw == 1)
        copy_bytes(out + i * run, src, run);
      else
        for (int64_t j = 0; j < g.kw; ++j) copy_bytes(out + (i * g.kw + j) * g.C, src + j * g.dw * g.C, g.C);
    }
  }
}

// ------------------------------------------------------------------------------- checks
float as_float(double v) { return static_cast<float>(v); }

// int8 for a signed grid within [-128, 127], uint8 for an unsigned one within [0, 255].
at::ScalarType codes_dtype(int64_t lo, int64_t hi, const char* op, const char* what) {
  if (lo >= 0 && hi <= 255) return at::kByte;
  TORCH_CHECK(lo >= -128 && hi <= 127, op, ": ", what, " [", lo, ", ", hi,
              "] fits neither int8 nor uint8 codes");
  return at::kChar;
}

struct Request {
  Epilogue e;
  at::ScalarType out_type;
};

Request make_epilogue(bool multiplier, at::ArrayRef<double> clamp, double out_step, at::IntArrayRef out_range,
                      bool has_res, double residual_step, at::ArrayRef<double> add_clamp, double add_step,
                      at::IntArrayRef add_range, bool residual_first, at::ScalarType residual_type,
                      const char* op) {
  TORCH_CHECK(clamp.size() == 2 && clamp[0] <= clamp[1], op, ": clamp takes two bounds, lo <= hi, got ", clamp);
  TORCH_CHECK(out_step >= 0 && std::isfinite(out_step), op, ": out_step must be positive (codes) or 0 (float output)");
  Epilogue e{};
  e.multiplier = multiplier;
  e.lo = as_float(clamp[0]);
  e.hi = as_float(clamp[1]);
  e.float_out = out_step == 0;
  e.residual = has_res;
  if (e.float_out) {
    TORCH_CHECK(!has_res && !multiplier, op, ": a residual or a multiplier needs a quantized output (out_step > 0)");
    return {e, at::kFloat};
  }
  TORCH_CHECK(out_range.size() == 2 && out_range[0] <= out_range[1], op, ": out_range takes [qmin, qmax], got ",
              out_range);
  at::ScalarType out_type = codes_dtype(out_range[0], out_range[1], op, "out_range");
  e.s1 = as_float(out_step);
  e.q1lo = static_cast<float>(out_range[0]);
  e.q1hi = static_cast<float>(out_range[1]);
  if (has_res) {
    TORCH_CHECK(residual_step > 0 && std::isfinite(residual_step) && add_step > 0 && std::isfinite(add_step), op,
                ": residual_step and add_step must be positive");
    TORCH_CHECK(add_clamp.size() == 2 && add_clamp[0] <= add_clamp[1], op, ": add_clamp takes two bounds, lo <= hi");
    TORCH_CHECK(add_range.size() == 2 && add_range[0] <= add_range[1], op, ": add_range takes [qmin, qmax]");
    out_type = codes_dtype(add_range[0], add_range[1], op, "add_range");
    // QLinearAdd's constants, each one float32 operation as MLAS computes them
    e.residual_first = residual_first;
    e.zq = out_range[0] < 0 ? 128.0f : 0.0f;
    e.zr = residual_type == at::kChar ? 128.0f : 0.0f;
    e.zc = add_range[0] < 0 ? 128.0f : 0.0f;
    const float s2 = as_float(add_step);
    const float r_layer = as_float(out_step) / s2, r_residual = as_float(residual_step) / s2;
    e.ra = residual_first ? r_residual : r_layer;
    e.rb = residual_first ? r_layer : r_residual;
    const float za = residual_first ? e.zr : e.zq, zb = residual_first ? e.zq : e.zr;
    const float weighted_a = e.ra * za, weighted_b = e.rb * zb;
    e.fixed = e.zc - (weighted_a + weighted_b);
    e.lo2 = as_float(add_clamp[0]);
    e.hi2 = as_float(add_clamp[1]);
    e.s2 = as_float(add_step);
    e.q2lo = static_cast<float>(add_range[0]);
    e.q2hi = static_cast<float>(add_range[1]);
  }
  return {e, out_type};
}

void check_codes(const Tensor& x, int64_t bits, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op,
              ": input codes must be int8 or uint8, got ", x.scalar_type());
  TORCH_CHECK(bits == 8 || x.scalar_type() == at::kChar, op, ": packed ", bits,
              "-bit weights take int8 input codes (uint8 codes: bits=8, or view codes below 128 as int8)");
}

// Output channels from the bias; the weights' shape checked against (N, K).
int64_t check_params(const Tensor& w, const Tensor& bias, const Tensor& unit, const std::optional<Tensor>& multiplier,
                     int64_t bits, int64_t K, const char* op) {
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kInt, op, ": bias must be int32 [out], got ",
              bias.scalar_type(), " ", bias.sizes());
  const int64_t N = bias.size(0);
  TORCH_CHECK(unit.dim() == 1 && unit.size(0) == N && unit.scalar_type() == at::kFloat, op,
              ": unit must be float32 [", N, "], got ", unit.scalar_type(), " ", unit.sizes());
  TORCH_CHECK(!multiplier.has_value() || (multiplier->dim() == 1 && multiplier->size(0) == N &&
                                            multiplier->scalar_type() == at::kFloat && multiplier->device().is_cpu()),
              op, ": multiplier must be float32 [", N, "] on the CPU");
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, op, ": bits must be 3, 4 (packed) or 8 (int8 lanes), got ", bits);
  if (bits == 8) {
    TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.size(0) == ceil_div(N, kLanes) &&
                    w.size(1) == ceil_div(K, 4) && w.size(2) == kLanes && w.size(3) == 4,
                op, ": 8-bit weights are int8 lanes panels [", ceil_div(N, kLanes), ", ", ceil_div(K, 4),
                ", 16, 4] for ", N, " channels and K=", K, " (fused_reference.lanes_weights), got ", w.scalar_type(),
                " ", w.sizes());
    TORCH_CHECK(ceil_div(K, 4) * 4 * 255 * 128 < 2147483647LL, op, ": K=", K, " could overflow int32 sums");
  } else {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(0) == N &&
                    w.size(1) == ceil_div(K, kBlock) * block_bytes(bits),
                op, ": ", bits, "-bit weights are packed uint8 [", N, ", ", ceil_div(K, kBlock) * block_bytes(bits),
                "] for K=", K, ", got ", w.scalar_type(), " ", w.sizes());
    TORCH_CHECK(ceil_div(K, kBlock) * kBlock * 128 * 8 < (int64_t(1) << 24), op, ": K=", K,
                " is too long for exact packed sums (at most 16320); use bits=8");
  }
  TORCH_CHECK(w.device().is_cpu() && bias.device().is_cpu() && unit.device().is_cpu(), op, ": CPU tensors only");
  return N;
}

Tensor residual_codes(const std::optional<Tensor>& residual, at::IntArrayRef shape, bool channels_last,
                      const char* op) {
  if (!residual.has_value()) return Tensor();
  const Tensor& r = *residual;
  TORCH_CHECK(r.scalar_type() == at::kChar || r.scalar_type() == at::kByte, op,
              ": residual codes must be int8 or uint8, got ", r.scalar_type());
  TORCH_CHECK(r.sizes() == shape, op, ": residual must have the output's shape ", shape, ", got ", r.sizes());
  TORCH_CHECK(r.device().is_cpu(), op, ": CPU tensors only");
  return channels_last ? r.contiguous(at::MemoryFormat::ChannelsLast) : r.contiguous();
}

// ----------------------------------------------------------------------------- the layer
// One layer's GEMM. Packed path: rows gathered by fill8(m0, rows, int8* dst, ld), or read in place;
// lanes path: row pointers from rows_at (run_lanes).
struct Layer {
  int64_t M, N, K, bits;
  const Tensor* w;
  const int32_t* bias;
  const float* unit;  // or the multiplier (Epilogue::multiplier)
  bool flip;  // int8 codes read as unsigned bytes: 128 * sum(w) comes off the bias
};

struct Output {
  const Epilogue* e;
  bool has_res;
  at::ScalarType res_type, out_type;
  const void* res;
  void* out;
  size_t out_size() const { return out_type == at::kFloat ? 4 : 1; }
  const void* res_rows(int64_t m0, int64_t N) const {
    return res ? static_cast<const void*>(static_cast<const char*>(res) + m0 * N) : nullptr;
  }
  void* out_rows(int64_t m0, int64_t N) const { return static_cast<char*>(out) + m0 * N * out_size(); }
};

// bias and unit repeated for `rows` rows: the epilogue runs one flat loop over a chunk
struct Tiled {
  std::vector<int32_t> bias;
  std::vector<float> unit;
  Tiled(const int32_t* b, const float* u, int64_t N, int64_t rows) : bias(rows * N), unit(rows * N) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(b, b + N, bias.begin() + r * N);
      std::copy(u, u + N, unit.begin() + r * N);
    }
  }
};

template <typename Fill8, typename Direct8>
void run_packed(const Layer& L, const Output& o, Fill8 fill8, Direct8 direct) {
  const auto& kt = cpu::kernels();
  const int64_t Kpad = ceil_div(L.K, kBlock) * kBlock;
  const Tiled tiled(L.bias, L.unit, L.N, kChunk);
  const std::vector<float> ones(std::max(kChunk, L.N), 1.0f);
  const EpilogueFn epi = select_epilogue<float>(current_isa(), *o.e, o.has_res, o.res_type, o.out_type);
  at::parallel_for(0, ceil_div(L.M, kChunk), 1, [&](int64_t b, int64_t end) {
    std::vector<int8_t> patches(kChunk * Kpad, 0);  // the bytes past K stay zero
    std::vector<int32_t> lanes(std::max(1, kt.lowbit_lanes) * kChunk);
    std::vector<float> acc(kChunk * L.N);
    LowbitArgs a;
    a.N = L.N;
    a.K = Kpad;
    a.bits = static_cast<int>(L.bits);
    a.G = 1;
    a.group_blocks = Kpad / kBlock;
    a.w = L.w->data_ptr<uint8_t>();
    a.w_row_bytes = L.w->size(1);
    a.scale = ones.data();
    a.x_scale = ones.data();
    a.ldx = Kpad;
    a.lane_sums = lanes.data();
    a.out = acc.data();
    a.ldo = L.N;
    for (int64_t c = b; c < end; ++c) {
      const int64_t m0 = c * kChunk, rows = std::min(kChunk, L.M - m0);
      const int8_t* in_place = direct(m0);
      if (in_place == nullptr) fill8(m0, rows, patches.data(), Kpad);
      a.M = rows;
      a.xq = in_place ? in_place : patches.data();
      if (kt.lowbit_lanes > 0) kt.lowbit_lane_sums(a, 0, rows);
      kt.lowbit_i8(a, 0, L.N);
      epi({acc.data(), L.N, tiled.bias.data(), tiled.unit.data(), rows, L.N, o.res_rows(m0, L.N),
           o.out_rows(m0, L.N)}, *o.e);
    }
  });
}

// The lanes tile this ISA runs for these weights (AVX2 needs |w| <= 64) and its rows per call.
struct LanesKernel {
  LanesFn fn;
  int MR;
};

LanesKernel lanes_for(Isa isa, const Tensor& panels) {
#if defined(QTOOL_FUSED_X86)
  if (isa == Isa::kAvx512) return {&lanes_tile_avx512, 12};
  if (isa == Isa::kAvx2) {
    const int8_t* w = panels.data_ptr<int8_t>();
    int peak = 0;
    for (int64_t i = 0; i < panels.numel(); ++i) peak = std::max(peak, std::abs(static_cast<int>(w[i])));
    if (peak <= 64) return {&lanes_tile_avx2, 4};
  }
#endif
  (void)isa;
  (void)panels;
  return {&lanes_tile_scalar, 4};
}

std::vector<int32_t> lanes_bias(const Layer& L) {
  std::vector<int32_t> bias(L.bias, L.bias + L.N);
  if (!L.flip) return bias;
  const int8_t* w = L.w->data_ptr<int8_t>();
  const int64_t K4 = L.w->size(1);
  for (int64_t n = 0; n < L.N; ++n) {
    const int8_t* panel = w + (n / kLanes) * K4 * 64 + (n % kLanes) * 4;
    int64_t sum = 0;
    for (int64_t t = 0; t < K4; ++t) sum += panel[t * 64] + panel[t * 64 + 1] + panel[t * 64 + 2] + panel[t * 64 + 3];
    const int64_t corrected = static_cast<int64_t>(bias[n]) - 128 * sum;
    TORCH_CHECK(corrected >= INT32_MIN && corrected <= INT32_MAX, "fused layer: bias out of the int32 range");
    bias[n] = static_cast<int32_t>(corrected);
  }
  return bias;
}

// rows(m0, count, base, scratch): the `count` row pointers of rows m0.. (scratch: kChunk * K4 * 4
// bytes the function may gather into); segments as in LaneTile.
template <typename Rows>
void run_lanes(const Layer& L, const Output& o, const std::vector<int64_t>& seg_off, int64_t L4, int64_t dummy_bytes,
               Rows rows_at) {
  const Isa isa = current_isa();
  const int64_t K4 = L.w->size(1), P = L.w->size(0), ld = P * kLanes;
  const LanesKernel kernel = lanes_for(isa, *L.w);
  const LanesFn tile = kernel.fn;
  const int MR = kernel.MR;
  const std::vector<int32_t> bias = lanes_bias(L);
  const Tiled tiled(bias.data(), L.unit, L.N, ld == L.N ? kChunk : 1);
  const std::vector<uint8_t> dummy(dummy_bytes, 0);
  const EpilogueFn epi = select_epilogue<int32_t>(isa, *o.e, o.has_res, o.res_type, o.out_type);
  at::parallel_for(0, ceil_div(L.M, kChunk), 1, [&](int64_t b, int64_t end) {
    std::vector<uint8_t> scratch(kChunk * K4 * 4, 0);
    std::vector<const uint8_t*> base(kChunk);
    std::vector<int32_t> acc(kChunk * ld);
    LaneTile t;
    t.seg_off = seg_off.data();
    t.S = static_cast<int64_t>(seg_off.size());
    t.L4 = L4;
    t.K4 = K4;
    t.panels = L.w->data_ptr<int8_t>();
    t.P = P;
    t.ld = ld;
    for (int64_t c = b; c < end; ++c) {
      const int64_t m0 = c * kChunk, rows = std::min(kChunk, L.M - m0);
      rows_at(m0, rows, base.data(), scratch.data());
      for (int64_t r0 = 0; r0 < rows; r0 += MR) {
        for (int r = 0; r < MR; ++r) t.base[r] = r0 + r < rows ? base[r0 + r] : dummy.data();
        t.acc = acc.data() + r0 * ld;
        tile(t);
      }
      epi({acc.data(), ld, tiled.bias.data(), tiled.unit.data(), rows, L.N, o.res_rows(m0, L.N),
           o.out_rows(m0, L.N)}, *o.e);
    }
  });
}

Tensor fused_conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& unit,
                    const std::optional<Tensor>& multiplier, int64_t bits,
                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, at::ArrayRef<double> clamp, double out_step, at::IntArrayRef out_range,
                    const std::optional<Tensor>& residual, double residual_step, at::ArrayRef<double> add_clamp,
                    double add_step, at::IntArrayRef add_range, bool residual_first) {
  const char* op = "fused_conv2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W] codes, got ", x.sizes());
  check_codes(x, bits, op);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation take two values each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 &&
                  dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              op, ": kernel, stride and dilation must be positive and padding non-negative");
  ConvShape g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Hp = g.H + 2 * g.ph, g.Wp = g.W + 2 * g.pw;
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the output would be empty (", g.OH, "x", g.OW, ")");
  const int64_t K = g.C * g.kh * g.kw;
  const int64_t O = check_params(w, bias, unit, multiplier, bits, K, op);
  const Request req = make_epilogue(multiplier.has_value(), clamp, out_step, out_range, residual.has_value(),
                                    residual_step, add_clamp, add_step, add_range, residual_first,
                                    residual.has_value() ? residual->scalar_type() : at::kByte, op);
  const Tensor res = residual_codes(residual, {g.N, O, g.OH, g.OW}, true, op);
  Tensor out = at::empty({g.N, O, g.OH, g.OW},
                         x.options().dtype(req.out_type).memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t M = g.N * g.OH * g.OW;
  if (M == 0 || O == 0) return out;

  const Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor bc = bias.contiguous(), uc = (multiplier.has_value() ? *multiplier : unit).contiguous();
  const Tensor wc = w.contiguous();
  const bool flip = bits == 8 && xc.scalar_type() == at::kChar;
  const Layer L{M, O, K, bits, &wc, bc.data_ptr<int32_t>(), uc.data_ptr<float>(), flip};
  const Output o{&req.e, res.defined(), res.defined() ? res.scalar_type() : at::kByte, req.out_type,
                 res.defined() ? res.data_ptr() : nullptr, out.data_ptr()};
  const Tensor padded = padded_bytes(xc, g.ph, g.pw, flip);
  const uint8_t* px = static_cast<const uint8_t*>(padded.data_ptr());

  if (bits != 8) {
    // 1x1, stride 1, no padding, whole blocks: the pixels are the rows.
    const bool in_place = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                          g.C % kBlock == 0;
    run_packed(
        L, o,
        [&](int64_t m0, int64_t rows, int8_t* dst, int64_t ld) {
          gather_patches(g, px, m0, rows, reinterpret_cast<uint8_t*>(dst), ld);
        },
        [&](int64_t m0) -> const int8_t* {
          return in_place ? reinterpret_cast<const int8_t*>(px) + m0 * g.C : nullptr;
        });
    return out;
  }
  const int64_t K4 = w.size(1);
  if (g.dw == 1 && (g.kw * g.C) % 4 == 0) {
    // in place: kh runs of kw * C bytes per output pixel
    std::vector<int64_t> seg_off(g.kh);
    for (int64_t i = 0; i < g.kh; ++i) seg_off[i] = i * g.dh * g.Wp * g.C;
    run_lanes(L, o, seg_off, g.kw * g.C / 4, seg_off.back() + g.kw * g.C,
              [&](int64_t m0, int64_t rows, const uint8_t** base, uint8_t*) {
                PixelCursor cur(m0, g.OH, g.OW);
                for (int64_t r = 0; r < rows; ++r, cur.next()) base[r] = px + g.origin(cur);
              });
  } else {
    run_lanes(L, o, {0}, K4, K4 * 4, [&](int64_t m0, int64_t rows, const uint8_t** base, uint8_t* scratch) {
      gather_patches(g, px, m0, rows, scratch, K4 * 4);  // the bytes past K stay zero
      for (int64_t r = 0; r < rows; ++r) base[r] = scratch + r * K4 * 4;
    });
  }
  return out;
}

Tensor fused_linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& unit,
                    const std::optional<Tensor>& multiplier, int64_t bits,
                    at::ArrayRef<double> clamp, double out_step, at::IntArrayRef out_range,
                    const std::optional<Tensor>& residual, double residual_step, at::ArrayRef<double> add_clamp,
                    double add_step, at::IntArrayRef add_range, bool residual_first) {
  const char* op = "fused_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K] codes, got ", x.sizes());
  check_codes(x, bits, op);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t O = check_params(w, bias, unit, multiplier, bits, K, op);
  const Request req = make_epilogue(multiplier.has_value(), clamp, out_step, out_range, residual.has_value(),
                                    residual_step, add_clamp, add_step, add_range, residual_first,
                                    residual.has_value() ? residual->scalar_type() : at::kByte, op);
  const Tensor res = residual_codes(residual, {M, O}, false, op);
  Tensor out = at::empty({M, O}, x.options().dtype(req.out_type));
  if (M == 0 || O == 0) return out;
  const Tensor xc = x.contiguous(), bc = bias.contiguous(), wc = w.contiguous();
  const Tensor uc = (multiplier.has_value() ? *multiplier : unit).contiguous();
  const bool flip = bits == 8 && xc.scalar_type() == at::kChar;
  const Layer L{M, O, K, bits, &wc, bc.data_ptr<int32_t>(), uc.data_ptr<float>(), flip};
  const Output o{&req.e, res.defined(), res.defined() ? res.scalar_type() : at::kByte, req.out_type,
                 res.defined() ? res.data_ptr() : nullptr, out.data_ptr()};
  const uint8_t* px = static_cast<const uint8_t*>(xc.data_ptr());
  if (bits != 8) {
    run_packed(
        L, o,
        [&](int64_t m0, int64_t rows, int8_t* dst, int64_t ld) {
          for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, px + (m0 + r) * K, K);
        },
        [&](int64_t m0) -> const int8_t* {
          return K % kBlock == 0 ? reinterpret_cast<const int8_t*>(px) + m0 * K : nullptr;
        });
    return out;
  }
  const int64_t K4 = w.size(1);
  const bool in_place = !flip && K % 4 == 0;
  run_lanes(L, o, {0}, K4, K4 * 4, [&](int64_t m0, int64_t rows, const uint8_t** base, uint8_t* scratch) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* src = px + (m0 + r) * K;
      if (in_place) {
        base[r] = src;
        continue;
      }
      uint8_t* dst = scratch + r * K4 * 4;  // the bytes past K stay zero
      if (flip)
        for (int64_t k = 0; k < K; ++k) dst[k] = src[k] ^ 0x80;
      else
        std::memcpy(dst, src, K);
      base[r] = dst;
    }
  });
  return out;
}

}  // namespace
}  // namespace qtool

TORCH_LIBRARY_IMPL(qtool, CPU, m) {
  m.impl("fused_conv2d", &qtool::fused_conv2d);
  m.impl("fused_linear", &qtool::fused_linear);
}
