// Argument checks shared by the CPU and CUDA implementations of the qtool operators, so both
// accept and reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>

#include <algorithm>
#include <optional>

#include "qtool_kernels.h"

namespace qtool {
namespace checks {

inline int64_t code_min(int bits) { return -(int64_t(1) << (bits - 1)); }
inline int64_t code_max(int bits) { return (int64_t(1) << (bits - 1)) - 1; }

// Codes [N, K] of an integer dtype within the signed `bits` range.
inline void codes(const at::Tensor& c, int bits) {
  TORCH_CHECK(c.dim() == 2, "pack_int", bits, ": codes must be 2-D [N, K], got shape ", c.sizes());
  TORCH_CHECK(!at::isFloatingType(c.scalar_type()) && !at::isComplexType(c.scalar_type()) &&
                  c.scalar_type() != at::kBool,
              "pack_int", bits, ": codes must be an integer tensor, got ", c.scalar_type());
  if (c.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(c);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK(lo_v >= code_min(bits) && hi_v <= code_max(bits), "pack_int", bits, ": codes must lie in [",
              code_min(bits), ", ", code_max(bits), "], got [", lo_v, ", ", hi_v, "]");
}

inline void packed(const at::Tensor& p, int bits, int64_t K, const char* op) {
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kByte, op, ": packed weights must be a 2-D uint8 tensor, got ",
              p.scalar_type(), " of shape ", p.sizes());
  TORCH_CHECK(K >= 0 && p.size(1) == ceil_div(K, kBlock) * block_bytes(bits), op, ": ", bits, "-bit rows of K=", K,
              " take ", ceil_div(K, kBlock) * block_bytes(bits), " bytes, got ", p.size(1));
}

inline void bits(const at::Tensor& b, int64_t K, const char* op, const char* what) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kLong, op, ": ", what,
              " must be a 2-D int64 tensor of packed bits, got ", b.scalar_type(), " of shape ", b.sizes());
  TORCH_CHECK(K >= 0 && b.size(1) == ceil_div(K, 64), op, ": ", what, " of K=", K, " take ", ceil_div(K, 64),
              " words per row, got ", b.size(1));
}

inline void float_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op,
              ": expected a 2-D floating-point tensor, got ", x.scalar_type(), " of shape ", x.sizes());
}

struct LowbitShape {
  int64_t N, G, group_blocks;
};

// The packed weights, their scales [N, G] (or [N] for one group) and the group size.
inline LowbitShape lowbit(const at::Tensor& w, const at::Tensor& scale, int64_t nbits, int64_t K, int64_t group_size,
                          const char* op) {
  TORCH_CHECK(nbits == 3 || nbits == 4, op, ": bits must be 3 or 4, got ", nbits);
  packed(w, static_cast<int>(nbits), K, op);
  TORCH_CHECK(w.is_contiguous(), op, ": packed weights must be contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), op,
              ": scale must be a contiguous float32 tensor, got ", scale.scalar_type());
  TORCH_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
  const int64_t N = w.size(0), G = std::max<int64_t>(ceil_div(K, group_size), 1);
  TORCH_CHECK(G == 1 || group_size % kBlock == 0, op, ": group_size must be a multiple of 64 or cover K, got ",
              group_size, " for K=", K);
  TORCH_CHECK((scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G) ||
                  (scale.dim() == 1 && scale.size(0) == N && G == 1),
              op, ": scale must have shape [", N, ", ", G, "], got ", scale.sizes());
  TORCH_CHECK(w.device() == scale.device(), op, ": weights and scale must be on the same device");
  return {N, G, G == 1 ? ceil_div(K, kBlock) : group_size / kBlock};
}

inline void lowbit_x(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == K, "lowbit_gemm: x must be float32 [M, ",
              K, "], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.device() == w.device(), "lowbit_gemm: x and w must be on the same device");
}

inline void lowbit_xq(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.size(1) == K, "lowbit_gemm_i8: xq must be int8 [M, ",
              K, "], got ", xq.scalar_type(), " ", xq.sizes());
  TORCH_CHECK(x_scale.dim() == 1 && x_scale.scalar_type() == at::kFloat && x_scale.size(0) == xq.size(0),
              "lowbit_gemm_i8: x_scale must be float32 [", xq.size(0), "], got ", x_scale.scalar_type(), " ",
              x_scale.sizes());
  TORCH_CHECK(xq.device() == w.device() && x_scale.device() == w.device(),
              "lowbit_gemm_i8: xq, x_scale and w must be on the same device");
}

// An optional per-channel (or single) float32 scale; returns its stride (0 broadcasts).
inline int64_t scale(const std::optional<at::Tensor>& s, int64_t channels, const char* op) {
  if (!s.has_value()) return 0;
  TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() <= 1 &&
                  (s->numel() == channels || s->numel() == 1),
              op, ": scale must be a contiguous float32 tensor of ", channels, " or 1 values, got ", s->scalar_type(),
              " ", s->sizes());
  return s->numel() == 1 ? 0 : 1;
}

inline ConvGeometry conv(const at::Tensor& x, const at::Tensor& w, int64_t in_channels, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "binary_conv2d";
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point [N, C, H, W] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == in_channels, op, ": x has ", x.size(1), " channels, the weights expect ", in_channels);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation take two values each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && kernel_size[0] <= 64 && kernel_size[1] <= 64, op,
              ": kernel sizes must lie in [1, 64], got ", kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": stride and dilation must be positive and padding non-negative");
  const ConvGeometry g = conv_geometry(x.size(0), in_channels, x.size(2), x.size(3), w.size(0), kernel_size[0],
                                       kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0],
                                       dilation[1]);
  bits(w, g.K, op, "w");
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the output would be empty (", g.OH, "x", g.OW, ")");
  TORCH_CHECK(x.device() == w.device(), op, ": x and w must be on the same device");
  return g;
}

}  // namespace checks
}  // namespace qtool

// Every op of the library, bound to the qtool::<op> functions of the translation unit that
// expands it (CPU or CUDA): one list, so a new op cannot be registered for one device only.
#define QTOOL_IMPL_ALL_OPS(m)                                \
  do {                                                       \
    (m).impl("pack_int4", &qtool::pack_int4);                \
    (m).impl("unpack_int4", &qtool::unpack_int4);            \
    (m).impl("pack_int3", &qtool::pack_int3);                \
    (m).impl("unpack_int3", &qtool::unpack_int3);            \
    (m).impl("pack_binary", &qtool::pack_binary);            \
    (m).impl("unpack_binary", &qtool::unpack_binary);        \
    (m).impl("quantize_rows_i8", &qtool::quantize_rows_i8);  \
    (m).impl("lowbit_gemm", &qtool::lowbit_gemm);            \
    (m).impl("lowbit_gemm_i8", &qtool::lowbit_gemm_i8);      \
    (m).impl("binary_gemm", &qtool::binary_gemm);            \
    (m).impl("binary_conv2d", &qtool::binary_conv2d);        \
  } while (0)
