// Torch-free test driver of the NEON kernels (the NEON sections of kernels/cpu/lowbit.cpp and
// binary.cpp): built for aarch64 by build.sh, cross-compiled on x86 and run under qemu-user by
// tests/kernels/test_neon.py, or natively on an ARM board.
//
//   harness isas          the kernel builds this CPU runs: scalar, neon, neondot (HWCAP_ASIMDDP)
//   harness dispatch      what kernels/cpu/dispatch.cpp (the torch library's loader) picks and
//                         lists: "<chosen> <available, best first>" (honours QTOOL_KERNEL_ISA)
//   harness selftest [N]  N random cases per op (default 200): every NEON build against the
//                         scalar build of the same sources (integers exact, fp32 within 1e-5)
//   harness cases DIR     for every DIR/<case>/case.txt (inputs written from
//                         qtool/lowbit/reference.py), writes <output>_<isa>.bin per build
//
// The ops below repeat what kernels/cpu/ops_cpu.cpp does around the kernel table (tails, 16-row
// chunks, panels, 48-row tiles, im2col), without torch.
#include <sys/auxv.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dispatch.h"
#include "layout.h"
#include "qtool_kernels.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

#define QTOOL_DECLARE_ISA(NS)                                                                              \
  namespace qtool {                                                                                        \
  namespace cpu {                                                                                          \
  namespace NS {                                                                                           \
  void pack_sign_rows(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t);                        \
  void pack_sign_planes(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t);                      \
  void binary_tile(const BinaryTileArgs&);                                                                 \
  bool binary_wants_nibbles();                                                                             \
  void binary_rows(const uint64_t*, int64_t, const uint64_t*, int64_t, int64_t, int64_t, int64_t,          \
                   const float*, int64_t, float*, int64_t);                                                \
  void quantize_rows_i8(const float*, int64_t, int64_t, int64_t, int8_t*, int64_t, float*);                \
  int lowbit_lanes();                                                                                      \
  void lowbit_lane_sums(const LowbitArgs&, int64_t, int64_t);                                              \
  void lowbit_i8(const LowbitArgs&, int64_t, int64_t);                                                     \
  void lowbit_f32(const LowbitArgs&, int64_t, int64_t);                                                    \
  }                                                                                                        \
  }                                                                                                        \
  }

#define QTOOL_TABLE(NS)                                                                                   \
  KernelTable {                                                                                           \
    #NS, &NS::pack_sign_rows, &NS::pack_sign_planes, &NS::binary_tile, NS::binary_wants_nibbles(),        \
        &NS::binary_rows, &NS::quantize_rows_i8, NS::lowbit_lanes(), &NS::lowbit_lane_sums, &NS::lowbit_i8, \
        &NS::lowbit_f32                                                                                   \
  }

QTOOL_DECLARE_ISA(scalar)
QTOOL_DECLARE_ISA(neon)
QTOOL_DECLARE_ISA(neondot)

namespace {

using namespace qtool;
using std::vector;

vector<KernelTable> tables() {
  using namespace qtool::cpu;
  vector<KernelTable> out = {QTOOL_TABLE(scalar), QTOOL_TABLE(neon)};
  if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) out.push_back(QTOOL_TABLE(neondot));
  return out;
}

// ------------------------------------------------------------------------------ the ops
vector<float> quantize(const KernelTable& kt, const vector<float>& x, int64_t M, int64_t K, vector<int8_t>& q) {
  vector<float> s(M);
  q.assign(M * K, 0);
  kt.quantize_rows_i8(x.data(), M, K, K, q.data(), K, s.data());
  return s;
}

// out [M][N] of lowbit_gemm_i8 (xq != null) or lowbit_gemm (x != null).
vector<float> lowbit(const KernelTable& kt, const int8_t* xq, const float* xs, const float* x, const uint8_t* w,
                     const float* scale, int64_t M, int64_t N, int64_t K, int bits, int64_t group_size) {
  vector<float> out(M * N, 0.0f);
  if (M == 0 || N == 0 || K == 0) return out;
  LowbitArgs a;
  a.M = M, a.N = N, a.K = K, a.bits = bits;
  a.G = group_size >= K ? 1 : ceil_div(K, group_size);
  a.group_blocks = a.G == 1 ? ceil_div(K, kBlock) : group_size / kBlock;
  a.w = w, a.w_row_bytes = ceil_div(K, kBlock) * block_bytes(bits), a.scale = scale;
  a.ldx = K, a.out = out.data(), a.ldo = N;
  const int64_t full = K / kBlock * kBlock;
  vector<int8_t> qtail;
  vector<float> ftail;
  vector<int32_t> lanes;
  if (xq) {
    a.xq = xq, a.x_scale = xs;
    if (K % kBlock) {
      qtail.assign(M * kBlock, 0);
      for (int64_t m = 0; m < M; ++m) std::memcpy(&qtail[m * kBlock], xq + m * K + full, K - full);
      a.xq_tail = qtail.data();
    }
    if (kt.lowbit_lanes > 0) {
      lanes.assign(M * a.G * kt.lowbit_lanes, 0);
      a.lane_sums = lanes.data();
      kt.lowbit_lane_sums(a, 0, M);
    }
  } else {
    a.x = x;
    if (K % kBlock) {
      ftail.assign(M * kBlock, 0.0f);
      for (int64_t m = 0; m < M; ++m) std::memcpy(&ftail[m * kBlock], x + m * K + full, 4 * (K - full));
      a.x_tail = ftail.data();
    }
  }
  for (int64_t n0 = 0; n0 < N; n0 += 16) (xq ? kt.lowbit_i8 : kt.lowbit_f32)(a, n0, std::min<int64_t>(N, n0 + 16));
  return out;
}

vector<float> binary_gemm(const KernelTable& kt, const uint64_t* act, const uint64_t* w, const float* scale,
                          int64_t scale_stride, int64_t M, int64_t N, int64_t K) {
  const int64_t Kw = ceil_div(K, 64);
  vector<float> out(M * N, 0.0f);
  if (M == 0 || N == 0) return out;
  if (M < 8) {  // ops_cpu.cpp: binary_by_rows
    kt.binary_rows(act, M, w, 0, N, Kw, K, scale, scale_stride, out.data(), N);
    return out;
  }
  vector<uint64_t> panels(ceil_div(N, kBinaryPanel) * Kw * kBinaryPanel);
  cpu::binary_panels(w, N, Kw, K, panels.data());
  vector<uint64_t> tile(kBinaryTileRows * std::max<int64_t>(Kw, 1));
  BinaryTileArgs t;
  t.Kw = Kw, t.K = K, t.panels = panels.data(), t.N = N, t.scale = scale, t.scale_stride = scale_stride;
  t.ldo = N, t.a = tile.data();
  for (int64_t m0 = 0; m0 < M; m0 += kBinaryTileRows) {
    t.rows = std::min(kBinaryTileRows, M - m0);
    cpu::copy_bit_rows(act + m0 * Kw, t.rows, Kw, K, tile.data());
    t.out = out.data() + m0 * N;
    kt.binary_tile(t);
  }
  return out;
}

// Output channels-last [N][OH][OW][O]; x is NCHW.
vector<float> binary_conv(const KernelTable& kt, const float* x, const uint64_t* w, const float* scale,
                          int64_t scale_stride, const ConvGeometry& g) {
  const int64_t hw = g.H * g.W, M = g.N * g.OH * g.OW;
  vector<uint64_t> px(g.N * hw * g.Cw);
  for (int64_t n = 0; n < g.N; ++n) kt.pack_sign_planes(x + n * g.C * hw, g.C, hw, hw, px.data() + n * hw * g.Cw, g.Cw);
  vector<uint64_t> panels(ceil_div(g.O, kBinaryPanel) * g.Kw * kBinaryPanel);
  cpu::binary_panels(w, g.O, g.Kw, g.K, panels.data());
  const cpu::PaddingCorrection pc = cpu::padding_correction(g, w);
  const cpu::Im2col plan = cpu::im2col_plan(g, px.data());
  vector<float> out(M * g.O, 0.0f);
  vector<uint64_t> tile(kBinaryTileRows * g.Kw);
  vector<int32_t> pattern(kBinaryTileRows);
  BinaryTileArgs t;
  t.Kw = g.Kw, t.K = g.K, t.panels = panels.data(), t.N = g.O, t.scale = scale, t.scale_stride = scale_stride;
  t.ldo = g.O, t.a = tile.data(), t.pattern = pattern.data(), t.corr = pc.any ? pc.table.data() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += kBinaryTileRows) {
    t.rows = std::min(kBinaryTileRows, M - m0);
    cpu::im2col_bits(g, plan, px.data(), m0, t.rows, tile.data(), pattern.data(), pc);
    t.out = out.data() + m0 * g.O;
    kt.binary_tile(t);
  }
  return out;
}

vector<uint64_t> pack_rows(const KernelTable& kt, const float* x, int64_t rows, int64_t K) {
  const int64_t Kw = ceil_div(K, 64);
  vector<uint64_t> out(rows * Kw);
  kt.pack_sign_rows(x, rows, K, K, out.data(), Kw);
  return out;
}

// ------------------------------------------------------------------------------ selftest
std::mt19937_64 rng(12345);
int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

vector<float> normal(int64_t n) {
  std::normal_distribution<float> d;
  vector<float> v(n);
  for (auto& x : v) x = d(rng);
  for (int64_t i = 0; i < n; i += 7) v[i] = 0.0f;  // sign(0) = +1 must hold
  return v;
}

vector<uint64_t> random_words(int64_t n) {
  vector<uint64_t> v(n);
  for (auto& x : v) x = rng();
  return v;
}

int failures = 0;

template <typename T>
void expect_equal(const char* what, const char* isa, const std::string& shape, const vector<T>& got,
                  const vector<T>& want) {
  if (got == want) return;
  int64_t i = 0;
  while (i < static_cast<int64_t>(got.size()) && got[i] == want[i]) ++i;
  std::printf("FAIL %s %s %s: first difference at %lld (%g vs %g)\n", what, isa, shape.c_str(),
              static_cast<long long>(i), static_cast<double>(got[i]), static_cast<double>(want[i]));
  ++failures;
}

void expect_close(const char* what, const char* isa, const std::string& shape, const vector<float>& got,
                  const vector<float>& want) {
  float peak = 0.0f;
  for (float v : want) peak = std::max(peak, std::fabs(v));
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= 1e-5f * peak + 1e-5f * std::fabs(want[i]))) {
      std::printf("FAIL %s %s %s: %zu: %g vs %g\n", what, isa, shape.c_str(), i, got[i], want[i]);
      ++failures;
      return;
    }
}

std::string dims(std::initializer_list<int64_t> v) {
  std::string s;
  for (int64_t x : v) s += (s.empty() ? "" : "x") + std::to_string(x);
  return s;
}

int selftest(int count) {
  const vector<KernelTable> kts = tables();
  const KernelTable& ref = kts[0];
  int64_t checks = 0;
  for (int it = 0; it < count; ++it) {
    // int4 / int3 GEMM: shapes across every tile size and K tail, per channel and grouped
    const int64_t M = it % 5 == 0 ? 1 : uniform(1, 13), N = uniform(1, 40), K = uniform(1, 400);
    const int bits = it % 2 ? 3 : 4;
    const int64_t group = it % 3 == 0 ? 64 * uniform(1, 3) : K;
    vector<int8_t> codes(N * K);
    for (auto& c : codes) c = static_cast<int8_t>(uniform(-(1 << (bits - 1)), (1 << (bits - 1)) - 1));
    vector<uint8_t> w(N * ceil_div(K, kBlock) * block_bytes(bits));
    (bits == 4 ? cpu::pack_int4 : cpu::pack_int3)(codes.data(), N, K, w.data());
    const int64_t G = group >= K ? 1 : ceil_div(K, group);
    vector<float> scale(N * G), unit(N * G, 1.0f);
    for (auto& s : scale) s = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
    const vector<float> x = normal(M * K);
    vector<int8_t> xq;
    const vector<float> xs = quantize(ref, x, M, K, xq);
    vector<int8_t> extreme(M * K, -128);  // int16 pair-sum bound of the baseline NEON dot
    const vector<float> ones(M, 1.0f);
    const std::string shape = dims({M, N, K, bits, group});
    for (size_t i = 1; i < kts.size(); ++i) {
      const KernelTable& kt = kts[i];
      vector<int8_t> q;
      const vector<float> s = quantize(kt, x, M, K, q);
      expect_equal("quantize_rows_i8", kt.name, shape, q, xq);
      expect_equal("quantize_rows_i8 scale", kt.name, shape, s, xs);
      const auto i8 = [&](const KernelTable& t, const int8_t* a, const float* as, const float* sc) {
        return lowbit(t, a, as, nullptr, w.data(), sc, M, N, K, bits, group);
      };
      // unit scales: exact integers whatever the grouping; real scales: exact per channel
      expect_equal("lowbit_gemm_i8 (unit scales)", kt.name, shape, i8(kt, xq.data(), ones.data(), unit.data()),
                   i8(ref, xq.data(), ones.data(), unit.data()));
      expect_equal("lowbit_gemm_i8 (-128)", kt.name, shape, i8(kt, extreme.data(), ones.data(), unit.data()),
                   i8(ref, extreme.data(), ones.data(), unit.data()));
      if (G == 1)
        expect_equal("lowbit_gemm_i8", kt.name, shape, i8(kt, xq.data(), xs.data(), scale.data()),
                     i8(ref, xq.data(), xs.data(), scale.data()));
      else
        expect_close("lowbit_gemm_i8", kt.name, shape, i8(kt, xq.data(), xs.data(), scale.data()),
                     i8(ref, xq.data(), xs.data(), scale.data()));
      expect_close("lowbit_gemm", kt.name, shape,
                   lowbit(kt, nullptr, nullptr, x.data(), w.data(), scale.data(), M, N, K, bits, group),
                   lowbit(ref, nullptr, nullptr, x.data(), w.data(), scale.data(), M, N, K, bits, group));
      checks += 5;
    }

    // binary GEMM: both the rows path (M < 8) and the panel tiles, garbage bits past K
    const int64_t bm = it % 4 == 0 ? uniform(1, 7) : uniform(8, 100), bn = uniform(1, 45), bk = uniform(1, 700);
    const int64_t bkw = ceil_div(bk, 64);
    const vector<uint64_t> act = random_words(bm * bkw), wb = random_words(bn * bkw);
    vector<float> bscale(bn);
    for (auto& s : bscale) s = std::uniform_real_distribution<float>(0.1f, 2.0f)(rng);
    const vector<float> fx = normal(bm * bk);
    const std::string bshape = dims({bm, bn, bk});
    for (size_t i = 1; i < kts.size(); ++i) {
      const KernelTable& kt = kts[i];
      expect_equal("binary_gemm", kt.name, bshape, binary_gemm(kt, act.data(), wb.data(), bscale.data(), 1, bm, bn, bk),
                   binary_gemm(ref, act.data(), wb.data(), bscale.data(), 1, bm, bn, bk));
      expect_equal("binary_gemm (no scale)", kt.name, bshape, binary_gemm(kt, act.data(), wb.data(), nullptr, 0, bm, bn, bk),
                   binary_gemm(ref, act.data(), wb.data(), nullptr, 0, bm, bn, bk));
      expect_equal("pack_sign_rows", kt.name, bshape, pack_rows(kt, fx.data(), bm, bk), pack_rows(ref, fx.data(), bm, bk));
      checks += 3;
    }

    // binary conv: channel counts for every im2col mode, strides, padding, dilation
    if (it % 4 == 0) {
      const int64_t Cs[] = {3, 8, 16, 24, 64, 72, 128};
      const int64_t C = Cs[uniform(0, 6)], O = uniform(1, 20), kh = uniform(1, 3), kw = uniform(1, 3);
      const int64_t s = uniform(1, 2), p = uniform(0, 2), d = uniform(1, 2);
      const int64_t H = uniform(std::max<int64_t>(1, d * (kh - 1) + 1 - 2 * p), 12);
      const int64_t W = uniform(std::max<int64_t>(1, d * (kw - 1) + 1 - 2 * p), 12);
      const ConvGeometry g = conv_geometry(2, C, H, W, O, kh, kw, s, s, p, p, d, d);
      const vector<float> cx = normal(g.N * C * H * W);
      vector<uint64_t> cw = random_words(O * g.Kw);
      for (int64_t o = 0; o < O; ++o)  // packed weights have zero bits past K
        if (g.K % 64) cw[o * g.Kw + g.Kw - 1] &= (1ULL << (g.K % 64)) - 1;
      const std::string cshape = dims({C, H, W, O, kh, kw, s, p, d});
      for (size_t i = 1; i < kts.size(); ++i) {
        expect_equal("binary_conv2d", kts[i].name, cshape, binary_conv(kts[i], cx.data(), cw.data(), bscale.data(), 0, g),
                     binary_conv(ref, cx.data(), cw.data(), bscale.data(), 0, g));
        checks += 1;
      }
    }
  }
  std::printf("selftest: %lld checks, %d failures; builds:", static_cast<long long>(checks), failures);
  for (const auto& kt : kts) std::printf(" %s", kt.name);
  std::printf("\n");
  return failures ? 1 : 0;
}

// ------------------------------------------------------------------------------ cases
template <typename T>
vector<T> read(const std::string& path, int64_t count) {
  vector<T> v(count);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(sizeof(T) * count));
  if (!f || f.gcount() != static_cast<std::streamsize>(sizeof(T) * count)) {
    std::fprintf(stderr, "harness: cannot read %lld values from %s\n", static_cast<long long>(count), path.c_str());
    std::exit(2);
  }
  return v;
}

template <typename T>
void write(const std::string& path, const vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(sizeof(T) * v.size()));
}

// case.txt: "op=lowbit_i8 M=3 N=5 K=63 bits=4 group=63" and so on; inputs as raw arrays.
int run_case(const std::string& dir, const vector<KernelTable>& kts) {
  std::ifstream f(dir + "/case.txt");
  std::map<std::string, std::string> kv;
  std::string item;
  while (f >> item) {
    const size_t eq = item.find('=');
    if (eq != std::string::npos) kv[item.substr(0, eq)] = item.substr(eq + 1);
  }
  auto num = [&](const char* key) { return static_cast<int64_t>(std::stoll(kv.at(key))); };
  const std::string op = kv["op"];
  for (const KernelTable& kt : kts) {
    const std::string suffix = std::string("_") + kt.name + ".bin";
    if (op == "quantize") {
      const int64_t M = num("M"), K = num("K");
      vector<int8_t> q;
      const vector<float> s = quantize(kt, read<float>(dir + "/x.bin", M * K), M, K, q);
      write(dir + "/q" + suffix, q);
      write(dir + "/s" + suffix, s);
    } else if (op == "lowbit_i8" || op == "lowbit_f32") {
      const int64_t M = num("M"), N = num("N"), K = num("K"), group = num("group");
      const int bits = static_cast<int>(num("bits"));
      const int64_t G = group >= K ? 1 : ceil_div(K, group);
      const auto w = read<uint8_t>(dir + "/w.bin", N * ceil_div(K, kBlock) * block_bytes(bits));
      const auto scale = read<float>(dir + "/scale.bin", N * G);
      if (op == "lowbit_i8") {
        const auto xq = read<int8_t>(dir + "/xq.bin", M * K);
        const auto xs = read<float>(dir + "/xs.bin", M);
        write(dir + "/out" + suffix, lowbit(kt, xq.data(), xs.data(), nullptr, w.data(), scale.data(), M, N, K, bits, group));
      } else {
        const auto x = read<float>(dir + "/x.bin", M * K);
        write(dir + "/out" + suffix, lowbit(kt, nullptr, nullptr, x.data(), w.data(), scale.data(), M, N, K, bits, group));
      }
    } else if (op == "binary_gemm") {
      const int64_t M = num("M"), N = num("N"), K = num("K"), Kw = ceil_div(K, 64);
      const auto a = read<uint64_t>(dir + "/a.bin", M * Kw), w = read<uint64_t>(dir + "/w.bin", N * Kw);
      const auto scale = read<float>(dir + "/scale.bin", N);
      write(dir + "/out" + suffix, binary_gemm(kt, a.data(), w.data(), scale.data(), 1, M, N, K));
    } else if (op == "binary_conv") {
      const ConvGeometry g = conv_geometry(num("N"), num("C"), num("H"), num("W"), num("O"), num("kh"), num("kw"),
                                           num("s"), num("s"), num("p"), num("p"), num("d"), num("d"));
      const auto x = read<float>(dir + "/x.bin", g.N * g.C * g.H * g.W);
      const auto w = read<uint64_t>(dir + "/w.bin", g.O * g.Kw);
      const auto scale = read<float>(dir + "/scale.bin", g.O);
      write(dir + "/out" + suffix, binary_conv(kt, x.data(), w.data(), scale.data(), 1, g));
    } else if (op == "pack_binary") {
      const int64_t M = num("M"), K = num("K");
      write(dir + "/out" + suffix, pack_rows(kt, read<float>(dir + "/x.bin", M * K).data(), M, K));
    } else {
      std::fprintf(stderr, "harness: %s: unknown op '%s'\n", dir.c_str(), op.c_str());
      return 2;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "isas") {
    for (const auto& kt : tables()) std::printf("%s\n", kt.name);
    return 0;
  }
  if (mode == "dispatch") {
    std::printf("%s %s\n", qtool::cpu::kernels().name, qtool::cpu::supported_isas().c_str());
    return 0;
  }
  if (mode == "selftest") return selftest(argc > 2 ? std::atoi(argv[2]) : 200);
  if (mode == "cases" && argc > 2) {
    // The pytest lists the case folders in DIR/cases.txt, one per line.
    std::ifstream list(std::string(argv[2]) + "/cases.txt");
    std::string name;
    int rc = 0;
    const vector<KernelTable> kts = tables();
    while (std::getline(list, name))
      if (!name.empty()) rc |= run_case(std::string(argv[2]) + "/" + name, kts);
    return rc;
  }
  std::fprintf(stderr, "usage: harness isas | dispatch | selftest [count] | cases DIR\n");
  return 2;
}
