// CPU implementations of the qtool operators: argument checks, output allocation and
// threading. Threads come from at::parallel_for, i.e. torch's own OpenMP pool, so
// torch.set_num_threads() governs them and no second OpenMP runtime is loaded. The arithmetic
// lives in the ISA kernels (dispatch.h) and the layout helpers (layout.h).

// Per-operator ATen headers instead of <ATen/ATen.h>: half the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dispatch.h"
#include "layout.h"
#include "op_checks.h"
#include "target_clones.h"

namespace qtool {
namespace {

using at::Tensor;

// binary_gemm with few activation rows reads the row-major weights directly (popcounts along K):
// transposing them into panels would cost as much as the product. From 8 rows on, panels win
// (no per-output horizontal sums, no partly filled vectors at the end of K).
bool binary_by_rows(int64_t M) { return M < 8; }

Tensor pack_codes(const Tensor& codes, int bits) {
  checks::codes(codes, bits);
  const Tensor c = codes.to(at::kChar).contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  Tensor out = at::empty({N, ceil_div(K, kBlock) * block_bytes(bits)}, c.options().dtype(at::kByte));
  (bits == 4 ? cpu::pack_int4 : cpu::pack_int3)(c.data_ptr<int8_t>(), N, K, out.data_ptr<uint8_t>());
  return out;
}

Tensor unpack_codes(const Tensor& packed, int64_t K, int bits) {
  checks::packed(packed, bits, K, bits == 4 ? "unpack_int4" : "unpack_int3");
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
  checks::float_rows(x, op);
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

Tensor unpack_binary(const Tensor& bits, int64_t K) {
  checks::bits(bits, K, "unpack_binary", "bits");
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

// The int4/int3 GEMM arguments but the activations.
LowbitArgs lowbit_args(const Tensor& w, const Tensor& scale, int64_t bits, int64_t K, int64_t group_size,
                       int64_t M, const char* op) {
  const checks::LowbitShape shape = checks::lowbit(w, scale, bits, K, group_size, op);
  LowbitArgs a;
  a.M = M;
  a.N = shape.N;
  a.K = K;
  a.bits = static_cast<int>(bits);
  a.G = shape.G;
  a.group_blocks = shape.group_blocks;
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
  checks::lowbit_x(x, w, K);
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
  checks::lowbit_xq(xq, x_scale, w, K);
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

Tensor binary_panels(const Tensor& w, int64_t K) {
  const int64_t N = w.size(0), Kw = w.size(1);
  Tensor panels = at::empty({ceil_div(N, kBinaryPanel) * Kw * kBinaryPanel}, w.options());
  cpu::binary_panels(reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>()), N, Kw, K,
                     reinterpret_cast<uint64_t*>(panels.data_ptr<int64_t>()));
  return panels;
}

// The panels split into nibble bytes, for kernels that want them (else undefined).
Tensor nibble_panels(const KernelTable& kt, const Tensor& panels, int64_t N, int64_t Kw) {
  if (!kt.binary_wants_nibbles) return Tensor();
  Tensor out = at::empty({panels.numel() * 2}, panels.options());
  cpu::binary_nibble_panels(reinterpret_cast<const uint64_t*>(panels.data_ptr<int64_t>()), ceil_div(N, kBinaryPanel),
                            Kw, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()));
  return out;
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
  checks::bits(a, K, "binary_gemm", "a");
  checks::bits(w, K, "binary_gemm", "w");
  const Tensor ac = a.contiguous(), wc = w.contiguous();
  const int64_t M = ac.size(0), N = wc.size(0), Kw = ac.size(1);
  const int64_t scale_stride = checks::scale(scale, N, "binary_gemm");
  Tensor out = at::empty({M, N}, ac.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  const auto& kt = cpu::kernels();
  if (binary_by_rows(M)) {
    const uint64_t* src = reinterpret_cast<const uint64_t*>(ac.data_ptr<int64_t>());
    const uint64_t* wsrc = reinterpret_cast<const uint64_t*>(wc.data_ptr<int64_t>());
    const float* s = scale.has_value() ? scale->data_ptr<float>() : nullptr;
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kw * M, 1)), [&](int64_t b, int64_t e) {
      kt.binary_rows(src, M, wsrc, b, e, Kw, K, s, scale_stride, dst, N);
    });
    return out;
  }
  const Tensor panels = binary_panels(wc, K);
  const Tensor nibbles = nibble_panels(kt, panels, N, Kw);
  BinaryTileArgs base = binary_args(panels, N, K, scale, scale_stride, out.data_ptr<float>(), N);
  base.panel_nibbles = nibbles.defined() ? reinterpret_cast<const uint64_t*>(nibbles.data_ptr<int64_t>()) : nullptr;
  const uint64_t* src = reinterpret_cast<const uint64_t*>(ac.data_ptr<int64_t>());
  at::parallel_for(0, ceil_div(M, kBinaryTileRows), 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> tile(kBinaryTileRows * std::max<int64_t>(Kw, 1));
    std::vector<uint64_t> scratch(kt.binary_wants_nibbles ? 2 * tile.size() : 0);
    for (int64_t i = b; i < e; ++i) {
      const int64_t m0 = i * kBinaryTileRows, rows = std::min(kBinaryTileRows, M - m0);
      cpu::copy_bit_rows(src + m0 * Kw, rows, Kw, K, tile.data());
      BinaryTileArgs t = base;
      t.a = tile.data();
      t.rows = rows;
      t.scratch = scratch.data();
      t.out = base.out + m0 * N;
      kt.binary_tile(t);
    }
  });
  return out;
}

// What follows a binary conv in BNN blocks, applied to each tile's output rows while they are in
// cache (one pass over the output instead of one per PyTorch op), per output channel o:
// y = dot * scale + bias; relu; y * post_scale + post_shift; + residual; relu. Null: skipped.
struct BinaryEpilogue {
  const float* bias = nullptr;
  bool relu_first = false;
  const float* post_scale = nullptr;
  const float* post_shift = nullptr;
  const float* residual = nullptr;  // [M][O], the output's channels-last layout
  bool relu_last = false;

  bool any() const { return bias || relu_first || post_scale || residual || relu_last; }

  void apply(float* out, int64_t m0, int64_t rows, int64_t O) const;
};

// One stage at a time over the tile's rows x O block (in cache): loops the compiler vectorizes,
// for the CPU at hand (QTOOL_CLONES).
QTOOL_CLONES void binary_epilogue(const BinaryEpilogue& ep, float* out, int64_t m0, int64_t rows, int64_t O) {
  const int64_t count = rows * O;
  if (ep.bias || ep.post_scale || ep.relu_first) {
    for (int64_t r = 0; r < rows; ++r) {
      float* y = out + r * O;
      if (ep.bias) {
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) y[o] += ep.bias[o];
      }
      if (ep.relu_first) {
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) y[o] = y[o] > 0.0f ? y[o] : 0.0f;
      }
      if (ep.post_scale) {
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) y[o] = y[o] * ep.post_scale[o] + ep.post_shift[o];
      }
    }
  }
  if (ep.residual) {
    const float* res = ep.residual + m0 * O;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] += res[i];
  }
  if (ep.relu_last) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = out[i] > 0.0f ? out[i] : 0.0f;
  }
}

void BinaryEpilogue::apply(float* out, int64_t m0, int64_t rows, int64_t O) const {
  binary_epilogue(*this, out, m0, rows, O);
}

// `residual` (the epilogue's add, any layout) is checked against the output geometry here.
Tensor binary_conv2d_impl(const char* op, const Tensor& x, const Tensor& w, int64_t in_channels,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, const std::optional<Tensor>& scale, BinaryEpilogue ep,
                          const std::optional<Tensor>& residual = std::nullopt) {
  const ConvGeometry g = checks::conv(x, w, in_channels, kernel_size, stride, padding, dilation);
  const int64_t scale_stride = checks::scale(scale, g.O, op);
  Tensor residual_cl;
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == g.N && residual->size(1) == g.O &&
                    residual->size(2) == g.OH && residual->size(3) == g.OW,
                op, ": residual must be [", g.N, ", ", g.O, ", ", g.OH, ", ", g.OW, "], got ", residual->sizes());
    TORCH_CHECK(residual->device() == x.device(), op, ": residual must be on the input's device");
    residual_cl = residual->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
    ep.residual = residual_cl.data_ptr<float>();
  }
  Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  if (g.N == 0 || g.O == 0) return out;

  // Sign bits of every input pixel's channels, [N * H * W][Cw], read from NCHW or channels-last
  // memory as it comes (any other layout is made NCHW first).
  const auto& kt = cpu::kernels();
  const Tensor xf = x.to(at::kFloat);
  const bool channels_last = xf.is_contiguous(at::MemoryFormat::ChannelsLast) && !xf.is_contiguous();
  const Tensor xc = channels_last ? xf : xf.contiguous();
  const float* xs = xc.data_ptr<float>();
  const int64_t hw = g.H * g.W, npix = g.N * hw;
  Tensor pixels = at::empty({npix, g.Cw}, x.options().dtype(at::kLong));
  uint64_t* px = reinterpret_cast<uint64_t*>(pixels.data_ptr<int64_t>());
  if (channels_last) {
    at::parallel_for(0, npix, std::max<int64_t>(1, 4096 / g.C), [&](int64_t b, int64_t e) {
      kt.pack_sign_rows(xs + b * g.C, e - b, g.C, g.C, px + b * g.Cw, g.Cw);
    });
  } else {
    constexpr int64_t chunk = 256;  // pixels of one image per task
    const int64_t chunks = ceil_div(hw, chunk);
    at::parallel_for(0, g.N * chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / chunks, p0 = task % chunks * chunk, count = std::min(chunk, hw - p0);
        kt.pack_sign_planes(xs + n * g.C * hw + p0, g.C, hw, count, px + (n * hw + p0) * g.Cw, g.Cw);
      }
    });
  }

  const Tensor wc = w.contiguous();
  const Tensor panels = binary_panels(wc, g.K);
  const Tensor nibbles = nibble_panels(kt, panels, g.O, g.Kw);
  const cpu::PaddingCorrection pc = cpu::padding_correction(g, reinterpret_cast<const uint64_t*>(wc.data_ptr<int64_t>()));
  const cpu::Im2col plan = cpu::im2col_plan(g, px);
  BinaryTileArgs base = binary_args(panels, g.O, g.K, scale, scale_stride, out.data_ptr<float>(), g.O);
  base.corr = pc.any ? pc.table.data() : nullptr;
  base.panel_nibbles = nibbles.defined() ? reinterpret_cast<const uint64_t*>(nibbles.data_ptr<int64_t>()) : nullptr;
  const int64_t M = g.N * g.OH * g.OW;
  at::parallel_for(0, ceil_div(M, kBinaryTileRows), 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> tile(kBinaryTileRows * g.Kw);
    std::vector<uint64_t> scratch(kt.binary_wants_nibbles ? 2 * tile.size() : 0);
    std::vector<int32_t> pattern(kBinaryTileRows);
    for (int64_t i = b; i < e; ++i) {
      const int64_t m0 = i * kBinaryTileRows, rows = std::min(kBinaryTileRows, M - m0);
      cpu::im2col_bits(g, plan, px, m0, rows, tile.data(), pattern.data(), pc);
      BinaryTileArgs t = base;
      t.a = tile.data();
      t.rows = rows;
      t.pattern = pattern.data();
      t.scratch = scratch.data();
      t.out = base.out + m0 * g.O;
      kt.binary_tile(t);
      if (ep.any()) ep.apply(t.out, m0, rows, g.O);
    }
  });
  return out;
}

Tensor binary_conv2d(const Tensor& x, const Tensor& w, int64_t in_channels, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     const std::optional<Tensor>& scale) {
  return binary_conv2d_impl("binary_conv2d", x, w, in_channels, kernel_size, stride, padding, dilation, scale, {});
}

// A per-channel float32 vector of the epilogue ([O] values), checked; null when absent.
const float* channel_vector(const std::optional<Tensor>& v, int64_t O, const char* what, std::vector<Tensor>& keep) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->numel() == O, "binary_conv2d_fused: ", what, " must hold ", O, " values, got ", v->sizes());
  keep.push_back(v->to(at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

Tensor binary_conv2d_fused(const Tensor& x, const Tensor& w, int64_t in_channels, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           const std::optional<Tensor>& scale, const std::optional<Tensor>& bias, bool relu_first,
                           const std::optional<Tensor>& post_scale, const std::optional<Tensor>& post_shift,
                           const std::optional<Tensor>& residual, bool relu_last) {
  const char* op = "binary_conv2d_fused";
  const int64_t O = w.size(0);
  TORCH_CHECK(post_scale.has_value() == post_shift.has_value(), op, ": post_scale and post_shift come together");
  std::vector<Tensor> keep;
  BinaryEpilogue ep;
  ep.bias = channel_vector(bias, O, "bias", keep);
  ep.relu_first = relu_first;
  ep.post_scale = channel_vector(post_scale, O, "post_scale", keep);
  ep.post_shift = channel_vector(post_shift, O, "post_shift", keep);
  ep.relu_last = relu_last;
  return binary_conv2d_impl(op, x, w, in_channels, kernel_size, stride, padding, dilation, scale, ep, residual);
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
  QTOOL_IMPL_ALL_OPS(m);
  // CPU only, like the fused integer layers (fused_layer.cpp): CUDA tensors run the reference.
  m.impl("binary_conv2d_fused", &qtool::binary_conv2d_fused);
}

// CPU-only controls of the ISA dispatch (no tensors, so no dispatch key: plain functions).
TORCH_LIBRARY_FRAGMENT(qtool, m) {
  m.def("_cpu_isa() -> str", &qtool::cpu_isa);
  m.def("_cpu_isas() -> str", &qtool::cpu_isas);
  m.def("_set_cpu_isa(str isa) -> str", &qtool::set_cpu_isa);
}
