// CPU implementations of the qtool operators: argument checks, output allocation and
// threading. Threads come from at::parallel_for, i.e. torch's own OpenMP pool, so
// torch.set_num_threads() governs them and no second OpenMP runtime is loaded. The arithmetic
// lives in the ISA kernels (dispatch.h) and the layout helpers (layout.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dispatch.h"
#include "layout.h"

namespace qtool {
namespace {

using at::Tensor;

int64_t code_min(int bits) { return -(int64_t(1) << (bits - 1)); }
int64_t code_max(int bits) { return (int64_t(1) << (bits - 1)) - 1; }

Tensor pack_codes(const Tensor& codes, int bits) {
  TORCH_CHECK(codes.dim() == 2, "pack_int", bits, ": codes must be 2-D [N, K], got shape ", codes.sizes());
  TORCH_CHECK(!at::isFloatingType(codes.scalar_type()) && !at::isComplexType(codes.scalar_type()),
              "pack_int", bits, ": codes must be an integer tensor, got ", codes.scalar_type());
  if (codes.numel() > 0) {
    const auto [lo, hi] = at::aminmax(codes);
    TORCH_CHECK(lo.item<int64_t>() >= code_min(bits) && hi.item<int64_t>() <= code_max(bits), "pack_int", bits,
                ": codes must lie in [", code_min(bits), ", ", code_max(bits), "], got [", lo.item<int64_t>(),
                ", ", hi.item<int64_t>(), "]");
  }
  const Tensor c = codes.to(at::kChar).contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  Tensor out = at::empty({N, ceil_div(K, kBlock) * block_bytes(bits)}, c.options().dtype(at::kByte));
  (bits == 4 ? cpu::pack_int4 : cpu::pack_int3)(c.data_ptr<int8_t>(), N, K, out.data_ptr<uint8_t>());
  return out;
}

void check_packed(const Tensor& packed, int bits, int64_t K, const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, op,
              ": packed weights must be a 2-D uint8 tensor, got ", packed.scalar_type(), " of shape ", packed.sizes());
  TORCH_CHECK(K >= 0 && packed.size(1) == ceil_div(K, kBlock) * block_bytes(bits), op, ": ", bits,
              "-bit rows of K=", K, " take ", ceil_div(K, kBlock) * block_bytes(bits), " bytes, got ", packed.size(1));
}

Tensor unpack_codes(const Tensor& packed, int64_t K, int bits) {
  check_packed(packed, bits, K, bits == 4 ? "unpack_int4" : "unpack_int3");
  const Tensor p = packed.contiguous();
  Tensor out = at::empty({p.size(0), K}, p.options().dtype(at::kChar));
  (bits == 4 ? cpu::unpack_int4 : cpu::unpack_int3)(p.data_ptr<uint8_t>(), p.size(0), K, out.data_ptr<int8_t>());
  return out;
}

Tensor pack_int4(const Tensor& codes) { return pack_codes(codes, 4); }
Tensor pack_int3(const Tensor& codes) { return pack_codes(codes, 3); }
Tensor unpack_int4(const Tensor& packed, int64_t K) { return unpack_codes(packed, K, 4); }
Tensor unpack_int3(const Tensor& packed, int64_t K) { return unpack_codes(packed, K, 3); }

Tensor float_rows(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op,
              ": expected a 2-D floating-point tensor, got ", x.scalar_type(), " of shape ", x.sizes());
  return x.to(at::kFloat).contiguous();
}

Tensor pack_binary(const Tensor& x) {
  const Tensor xf = float_rows(x, "pack_binary");
  const int64_t rows = xf.size(0), K = xf.size(1), Kw = ceil_div(K, 64);
  Tensor out = at::empty({rows, Kw}, xf.options().dtype(at::kLong));
  const auto& kt = cpu::kernels();
  const float* src = xf.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    kt.pack_sign_rows(src + b * K, e - b, K, K, dst + b * Kw, Kw);
  });
  return out;
}

void check_bits(const Tensor& bits, int64_t K, const char* op, const char* what) {
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kLong, op, ": ", what,
              " must be a 2-D int64 tensor of packed bits, got ", bits.scalar_type(), " of shape ", bits.sizes());
  TORCH_CHECK(K >= 0 && bits.size(1) == ceil_div(K, 64), op, ": ", what, " of K=", K, " take ", ceil_div(K, 64),
              " words per row, got ", bits.size(1));
}

Tensor unpack_binary(const Tensor& bits, int64_t K) {
  check_bits(bits, K, "unpack_binary", "bits");
  const Tensor b = bits.contiguous();
  Tensor out = at::empty({b.size(0), K}, b.options().dtype(at::kFloat));
  const uint64_t* src = reinterpret_cast<const uint64_t*>(b.data_ptr<int64_t>());
  float* dst = out.data_ptr<float>();
  const int64_t Kw = b.size(1);
  at::parallel_for(0, b.size(0), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k) dst[r * K + k] = (src[r * Kw + k / 64] >> (k % 64)) & 1 ? 1.0f : -1.0f;
  });
  return out;
}

std::tuple<Tensor, Tensor> quantize_rows_i8(const Tensor& x) {
  const Tensor xf = float_rows(x, "quantize_rows_i8");
  const int64_t M = xf.size(0), K = xf.size(1);
  Tensor q = at::empty({M, K}, xf.options().dtype(at::kChar));
  Tensor s = at::empty({M}, xf.options());
  const auto& kt = cpu::kernels();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    kt.quantize_rows_i8(xf.data_ptr<float>() + b * K, e - b, K, K, q.data_ptr<int8_t>() + b * K, K,
                        s.data_ptr<float>() + b);
  });
  return {q, s};
}

// Shared checks of the int4/int3 GEMMs; fills everything but the activations.
LowbitArgs lowbit_args(const Tensor& w, const Tensor& scale, int64_t bits, int64_t K, int64_t group_size,
                       int64_t M, const char* op) {
  TORCH_CHECK(bits == 3 || bits == 4, op, ": bits must be 3 or 4, got ", bits);
  check_packed(w, static_cast<int>(bits), K, op);
  TORCH_CHECK(w.is_contiguous(), op, ": packed weights must be contiguous");
  const int64_t N = w.size(0), blocks = ceil_div(K, kBlock);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), op, ": scale must be a contiguous float32 tensor");
  TORCH_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
  const int64_t G = ceil_div(K, group_size);
  TORCH_CHECK(G <= 1 || group_size % kBlock == 0, op, ": group_size must be a multiple of 64 or cover K, got ",
              group_size, " for K=", K);
  TORCH_CHECK((scale.dim() == 2 && scale.size(0) == N && scale.size(1) == std::max<int64_t>(G, 1)) ||
                  (scale.dim() == 1 && scale.size(0) == N && G <= 1),
              op, ": scale must have shape [", N, ", ", G, "], got ", scale.sizes());
  LowbitArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.bits = static_cast<int>(bits);
  a.G = std::max<int64_t>(G, 1);
  a.group_blocks = G <= 1 ? blocks : group_size / kBlock;
  a.w = w.data_ptr<uint8_t>();
  a.w_row_bytes = w.size(1);
  a.scale = scale.data_ptr<float>();
  return a;
}

// The partial last 64-block of every row, zero-padded, or an undefined tensor when K % 64 == 0.
Tensor row_tails(const Tensor& x) {
  const int64_t K = x.size(1), full = K / kBlock * kBlock;
  if (K % kBlock == 0) return Tensor();
  Tensor tails = at::zeros({x.size(0), kBlock}, x.options());
  tails.narrow(1, 0, K - full).copy_(x.narrow(1, full, K - full));
  return tails;
}

// Weight rows in chunks of 16 (a multiple of every NR) over the threads.
template <typename F>
void over_weight_rows(int64_t N, F fn) {
  at::parallel_for(0, ceil_div(N, 16), 1, [&](int64_t b, int64_t e) { fn(b * 16, std::min(N, e * 16)); });
}

Tensor lowbit_gemm(const Tensor& x, const Tensor& w, const Tensor& scale, int64_t bits, int64_t K, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == K, "lowbit_gemm: x must be float32 [M, ", K,
              "], got ", x.scalar_type(), " ", x.sizes());
  const Tensor xc = x.contiguous();
  LowbitArgs a = lowbit_args(w, scale, bits, K, group_size, xc.size(0), "lowbit_gemm");
  Tensor out = at::empty({a.M, a.N}, xc.options());
  if (a.M == 0 || a.N == 0) return out;
  if (K == 0) return out.zero_();
  const Tensor tails = row_tails(xc);
  a.x = xc.data_ptr<float>();
  a.ldx = K;
  a.x_tail = tails.defined() ? tails.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  a.ldo = a.N;
  const auto& kt = cpu::kernels();
  over_weight_rows(a.N, [&](int64_t n0, int64_t n1) { kt.lowbit_f32(a, n0, n1); });
  return out;
}

Tensor lowbit_gemm_i8(const Tensor& xq, const Tensor& x_scale, const Tensor& w, const Tensor& scale, int64_t bits,
                      int64_t K, int64_t group_size) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.size(1) == K, "lowbit_gemm_i8: xq must be int8 [M, ",
              K, "], got ", xq.scalar_type(), " ", xq.sizes());
  TORCH_CHECK(x_scale.dim() == 1 && x_scale.scalar_type() == at::kFloat && x_scale.size(0) == xq.size(0),
              "lowbit_gemm_i8: x_scale must be float32 [", xq.size(0), "], got ", x_scale.scalar_type(), " ",
              x_scale.sizes());
  const Tensor xc = xq.contiguous(), xs = x_scale.contiguous();
  LowbitArgs a = lowbit_args(w, scale, bits, K, group_size, xc.size(0), "lowbit_gemm_i8");
  Tensor out = at::empty({a.M, a.N}, xs.options());
  if (a.M == 0 || a.N == 0) return out;
  if (K == 0) return out.zero_();
  const Tensor tails = row_tails(xc);
  a.xq = xc.data_ptr<int8_t>();
  a.ldx = K;
  a.xq_tail = tails.defined() ? tails.data_ptr<int8_t>() : nullptr;
  a.x_scale = xs.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.ldo = a.N;
  const auto& kt = cpu::kernels();
  Tensor lane_sums;
  if (kt.lowbit_lanes > 0) {
    lane_sums = at::empty({a.M * a.G * kt.lowbit_lanes}, xs.options().dtype(at::kInt));
    a.lane_sums = lane_sums.data_ptr<int32_t>();
    at::parallel_for(0, a.M, 1, [&](int64_t b, int64_t e) { kt.lowbit_lane_sums(a, b, e); });
  }
  over_weight_rows(a.N, [&](int64_t n0, int64_t n1) { kt.lowbit_i8(a, n0, n1); });
  return out;
}

// Checks an optional per-channel (or single) scale; returns its stride (0 broadcasts).
int64_t check_scale(const std::optional<Tensor>& scale, int64_t channels, const char* op) {
  if (!scale.has_value()) return 0;
  const Tensor& s = *scale;
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() <= 1 &&
                  (s.numel() == channels || s.numel() == 1),
              op, ": scale must be a contiguous float32 tensor of ", channels, " or 1 values, got ", s.scalar_type(),
              " ", s.sizes());
  return s.numel() == 1 ? 0 : 1;
}

Tensor binary_panels(const Tensor& w, int64_t K) {
  const int64_t N = w.size(0), Kw = w.size(1);
  Tensor panels = at::empty({ceil_div(N, kBinaryPanel) * Kw * kBinaryPanel}, w.options());
  cpu::binary_panels(reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>()), N, Kw, K,
                     reinterpret_cast<uint64_t*>(panels.data_ptr<int64_t>()));
  return panels;
}

BinaryTileArgs binary_args(const Tensor& panels, int64_t N, int64_t K, const std::optional<Tensor>& scale,
                           int64_t scale_stride, float* out, int64_t ldo) {
  BinaryTileArgs t;
  t.Kw = ceil_div(K, 64);
  t.K = K;
  t.panels = reinterpret_cast<const uint64_t*>(panels.data_ptr<int64_t>());
  t.N = N;
  t.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  t.scale_stride = scale_stride;
  t.out = out;
  t.ldo = ldo;
  return t;
}

Tensor binary_gemm(const Tensor& a, const Tensor& w, int64_t K, const std::optional<Tensor>& scale) {
  check_bits(a, K, "binary_gemm", "a");
  check_bits(w, K, "binary_gemm", "w");
  const Tensor ac = a.contiguous(), wc = w.contiguous();
  const int64_t M = ac.size(0), N = wc.size(0), Kw = ac.size(1);
  const int64_t scale_stride = check_scale(scale, N, "binary_gemm");
  Tensor out = at::empty({M, N}, ac.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  const Tensor panels = binary_panels(wc, K);
  const BinaryTileArgs base = binary_args(panels, N, K, scale, scale_stride, out.data_ptr<float>(), N);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(ac.data_ptr<int64_t>());
  const auto& kt = cpu::kernels();
  at::parallel_for(0, ceil_div(M, kBinaryTileRows), 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> tile(kBinaryTileRows * std::max<int64_t>(Kw, 1));
    for (int64_t i = b; i < e; ++i) {
      const int64_t m0 = i * kBinaryTileRows, rows = std::min(kBinaryTileRows, M - m0);
      cpu::copy_bit_rows(src + m0 * Kw, rows, Kw, K, tile.data());
      BinaryTileArgs t = base;
      t.a = tile.data();
      t.rows = rows;
      t.out = base.out + m0 * N;
      kt.binary_tile(t);
    }
  });
  return out;
}

Tensor binary_conv2d(const Tensor& x, const Tensor& w, int64_t in_channels, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     const std::optional<Tensor>& scale) {
  const char* op = "binary_conv2d";
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point [N, C, H, W] tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == in_channels, op, ": x has ", x.size(1), " channels, the weights expect ", in_channels);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation take two values each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && kernel_size[0] <= 64 && kernel_size[1] <= 64, op,
              ": kernel sizes must lie in [1, 64], got ", kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": stride and dilation must be positive and padding non-negative");
  const cpu::ConvGeometry g = cpu::conv_geometry(x.size(0), in_channels, x.size(2), x.size(3), w.size(0),
                                                 kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                                                 padding[1], dilation[0], dilation[1]);
  check_bits(w, g.K, op, "w");
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the output would be empty (", g.OH, "x", g.OW, ")");
  const int64_t scale_stride = check_scale(scale, g.O, op);
  Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  if (g.N == 0 || g.O == 0) return out;

  // Sign bits of every input pixel's channels, [N * H * W][Cw].
  const Tensor xc = x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t npix = g.N * g.H * g.W;
  Tensor pixels = at::empty({npix, g.Cw}, x.options().dtype(at::kLong));
  const auto& kt = cpu::kernels();
  const float* xs = xc.data_ptr<float>();
  uint64_t* px = reinterpret_cast<uint64_t*>(pixels.data_ptr<int64_t>());
  at::parallel_for(0, npix, std::max<int64_t>(1, 4096 / g.C), [&](int64_t b, int64_t e) {
    kt.pack_sign_rows(xs + b * g.C, e - b, g.C, g.C, px + b * g.Cw, g.Cw);
  });

  const Tensor wc = w.contiguous();
  const Tensor panels = binary_panels(wc, g.K);
  const cpu::PaddingCorrection pc = cpu::padding_correction(g, reinterpret_cast<const uint64_t*>(wc.data_ptr<int64_t>()));
  BinaryTileArgs base = binary_args(panels, g.O, g.K, scale, scale_stride, out.data_ptr<float>(), g.O);
  base.corr = pc.any ? pc.table.data() : nullptr;
  const int64_t M = g.N * g.OH * g.OW;
  at::parallel_for(0, ceil_div(M, kBinaryTileRows), 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> tile(kBinaryTileRows * g.Kw);
    std::vector<int32_t> pattern(kBinaryTileRows);
    for (int64_t i = b; i < e; ++i) {
      const int64_t m0 = i * kBinaryTileRows, rows = std::min(kBinaryTileRows, M - m0);
      cpu::im2col_bits(g, px, m0, rows, tile.data(), pattern.data(), pc);
      BinaryTileArgs t = base;
      t.a = tile.data();
      t.rows = rows;
      t.pattern = pattern.data();
      t.out = base.out + m0 * g.O;
      kt.binary_tile(t);
    }
  });
  return out;
}

std::string cpu_isa() { return cpu::kernels().name; }
std::string cpu_isas() { return cpu::supported_isas(); }
std::string set_cpu_isa(const std::string& name) {
  const std::string error = cpu::select_isa(name);
  TORCH_CHECK(error.empty(), "qtool::_set_cpu_isa: ", error);
  return cpu::kernels().name;
}

}  // namespace
}  // namespace qtool

TORCH_LIBRARY_IMPL(qtool, CPU, m) {
  m.impl("pack_int4", &qtool::pack_int4);
  m.impl("unpack_int4", &qtool::unpack_int4);
  m.impl("pack_int3", &qtool::pack_int3);
  m.impl("unpack_int3", &qtool::unpack_int3);
  m.impl("pack_binary", &qtool::pack_binary);
  m.impl("unpack_binary", &qtool::unpack_binary);
  m.impl("quantize_rows_i8", &qtool::quantize_rows_i8);
  m.impl("lowbit_gemm", &qtool::lowbit_gemm);
  m.impl("lowbit_gemm_i8", &qtool::lowbit_gemm_i8);
  m.impl("binary_gemm", &qtool::binary_gemm);
  m.impl("binary_conv2d", &qtool::binary_conv2d);
}

// CPU-only controls of the ISA dispatch (no tensors, so no dispatch key: plain functions).
TORCH_LIBRARY_FRAGMENT(qtool, m) {
  m.def("_cpu_isa() -> str", &qtool::cpu_isa);
  m.def("_cpu_isas() -> str", &qtool::cpu_isas);
  m.def("_set_cpu_isa(str isa) -> str", &qtool::set_cpu_isa);
}
