"""Pure-PyTorch implementation of every low-bit ``qtool`` operator: the test oracle, and the fallback
registered under the same names when the compiled library is unavailable.

Each function takes the arguments of its operator schema (``ops.SCHEMAS``) and follows the
packed layouts of ``kernels/include/qtool_kernels.h``:

- int4: blocks of 64 codes in 32 bytes; byte j = (u[j]) | (u[j + 32] << 4), u = code + 8.
- int3: blocks of 64 codes in 24 bytes, u = code + 4; bytes 0..15 hold the low two bits
  (byte j = u2[j] | u2[j+16] << 2 | u2[j+32] << 4 | u2[j+48] << 6), bytes 16..23 a 64-bit
  little-endian word whose bit i is bit 2 of u[i].
- binary: bit k % 64 of int64 word k // 64 is 1 for +1 (x >= 0, so sign(0) = +1), 0 for -1.

Integer parts are computed exactly (float64 holds every sum these ops can produce).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64
_BLOCK_BYTES = {4: 32, 3: 24}
_OFFSET = {4: 8, 3: 4}


def _blocks(K: int) -> int:
    return -(-K // BLOCK)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    torch._check(codes.dim() == 2, lambda: f"pack_int{bits}: codes must be 2-D [N, K], got {tuple(codes.shape)}")
    torch._check(not codes.is_floating_point(), lambda: f"pack_int{bits}: codes must be an integer tensor")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if codes.numel():
        cmin, cmax = int(codes.min()), int(codes.max())
        torch._check(lo <= cmin and cmax <= hi,
                     lambda: f"pack_int{bits}: codes must lie in [{lo}, {hi}], got [{cmin}, {cmax}]")


def _padded_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """u = code + offset as int64 [N, blocks, 64], padded with code 0."""
    N, K = codes.shape
    u = torch.full((N, _blocks(K) * BLOCK), _OFFSET[bits], dtype=torch.int64, device=codes.device)
    u[:, :K] = codes.to(torch.int64) + _OFFSET[bits]
    return u.view(N, _blocks(K), BLOCK)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    _check_codes(codes, 4)
    u = _padded_unsigned(codes, 4)
    return (u[..., :32] | (u[..., 32:] << 4)).to(torch.uint8).reshape(codes.shape[0], u.shape[1] * 32)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    N = packed.shape[0]
    b = packed.to(torch.int64).view(N, _blocks(K), 32)
    u = torch.cat([b & 15, b >> 4], dim=2).reshape(N, _blocks(K) * BLOCK)
    return (u[:, :K] - 8).to(torch.int8)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    _check_codes(codes, 3)
    u = _padded_unsigned(codes, 3)
    low = u & 3
    planes = low[..., 0:16] | (low[..., 16:32] << 2) | (low[..., 32:48] << 4) | (low[..., 48:64] << 6)
    high = (u >> 2) & 1  # bit i of the 64-bit word, as 8 little-endian bytes
    weights = 2 ** torch.arange(8, device=codes.device, dtype=torch.int64)
    high_bytes = (high.view(*high.shape[:2], 8, 8) * weights).sum(-1)
    return torch.cat([planes, high_bytes], dim=2).to(torch.uint8).reshape(codes.shape[0], u.shape[1] * 24)


def unpack_int3(packed: torch.Tensor, K: int) -> torch.Tensor:
    N = packed.shape[0]
    b = packed.to(torch.int64).view(N, _blocks(K), 24)
    planes, high_bytes = b[..., :16], b[..., 16:]
    low = torch.cat([(planes >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    high = torch.stack([(high_bytes >> s) & 1 for s in range(8)], dim=3).reshape(N, _blocks(K), BLOCK)
    return ((low | (high << 2)).reshape(N, _blocks(K) * BLOCK)[:, :K] - 4).to(torch.int8)


def _bit_weights(device) -> torch.Tensor:
    # Bit 63 has weight -2**63 in int64: the two's-complement word has the same bits.
    w = 2 ** torch.arange(64, dtype=torch.int64, device=device)
    w[63] = -(2**63)
    return w


def pack_binary(x: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and x.is_floating_point(), lambda: "pack_binary: expected a 2-D floating-point tensor")
    rows, K = x.shape
    bits = torch.zeros(rows, _blocks(K) * BLOCK, dtype=torch.int64, device=x.device)
    bits[:, :K] = (x >= 0).to(torch.int64)
    return (bits.view(rows, _blocks(K), BLOCK) * _bit_weights(x.device)).sum(-1)


def unpack_binary(bits: torch.Tensor, K: int) -> torch.Tensor:
    shifts = torch.arange(64, device=bits.device)
    b = (bits.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 63 still lands in bit 0
    return (b.reshape(bits.shape[0], bits.shape[1] * 64)[:, :K] * 2 - 1).to(torch.float32)


def quantize_rows_i8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _unpack(w: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    torch._check(bits in (3, 4), lambda: f"bits must be 3 or 4, got {bits}")
    return unpack_int4(w, K) if bits == 4 else unpack_int3(w, K)


def _group_scale(scale: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """The [N, G] scale expanded to one value per weight, [N, K]."""
    scale = scale.reshape(scale.shape[0], -1)
    return scale[:, torch.arange(K, device=scale.device) // group_size]


def lowbit_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bits: int, K: int, group_size: int) -> torch.Tensor:
    """x [M, K] float32 @ (code * scale).T: the dequantized weights, then a float matmul."""
    weights = _unpack(w, bits, K).to(torch.float32) * _group_scale(scale, K, group_size)
    return x @ weights.T


def lowbit_gemm_i8(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bits: int,
                   K: int, group_size: int) -> torch.Tensor:
    """x_scale[m] * sum_g scale[n, g] * (exact integer dot of group g)."""
    codes = _unpack(w, bits, K).to(torch.float64)
    a = xq.to(torch.float64)
    scale = scale.reshape(scale.shape[0], -1)
    out = None
    for g in range(scale.shape[1]):
        part = slice(g * group_size, min(K, (g + 1) * group_size))
        dot = (a[:, part] @ codes[:, part].T).to(torch.float32)  # exact integers
        term = dot * scale[:, g]
        out = term if out is None else out + term
    if out is None:
        out = torch.zeros(xq.shape[0], w.shape[0], dtype=torch.float32, device=xq.device)
    return out * x_scale[:, None]


def binary_gemm(a: torch.Tensor, w: torch.Tensor, K: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    dot = (unpack_binary(a, K).double() @ unpack_binary(w, K).double().T).to(torch.float32)
    return dot if scale is None else dot * scale.reshape(-1)


def binary_weight_order(w: torch.Tensor) -> torch.Tensor:
    """Conv weights [O, C, kh, kw] as rows [O, kh * kw * C]: the K order of binary_conv2d."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def binary_conv2d(x: torch.Tensor, w: torch.Tensor, in_channels: int, kernel_size: list[int], stride: list[int],
                  padding: list[int], dilation: list[int], scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(sign(x), sign(W)) with zero padding, times the per-channel scale."""
    kh, kw = kernel_size
    weights = unpack_binary(w, in_channels * kh * kw).view(-1, kh, kw, in_channels).permute(0, 3, 1, 2)
    signs = torch.where(x >= 0, 1.0, -1.0).to(torch.float64)
    out = F.conv2d(signs, weights.double(), stride=stride, padding=padding, dilation=dilation).to(torch.float32)
    if scale is not None:
        out = out * scale.reshape(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last)


def binary_conv2d_fused(x, w, in_channels, kernel_size, stride, padding, dilation, scale, bias, relu_first,
                        post_scale, post_shift, residual, relu_last) -> torch.Tensor:
    """``binary_conv2d`` and the epilogue of a BNN block, per output channel and in this order:
    ``+ bias``, ReLU, ``* post_scale + post_shift`` (an eval-mode BatchNorm), ``+ residual``, ReLU."""
    y = binary_conv2d(x, w, in_channels, kernel_size, stride, padding, dilation, scale)

    def per_channel(v):
        return v.float().reshape(1, -1, 1, 1)

    if bias is not None:
        y = y + per_channel(bias)
    if relu_first:
        y = torch.relu(y)
    if post_scale is not None:
        y = y * per_channel(post_scale) + per_channel(post_shift)
    if residual is not None:
        y = y + residual.float()
    if relu_last:
        y = torch.relu(y)
    return y.contiguous(memory_format=torch.channels_last)


OPS = {
    "pack_int4": pack_int4,
    "unpack_int4": unpack_int4,
    "pack_int3": pack_int3,
    "unpack_int3": unpack_int3,
    "pack_binary": pack_binary,
    "unpack_binary": unpack_binary,
    "quantize_rows_i8": quantize_rows_i8,
    "lowbit_gemm": lowbit_gemm,
    "lowbit_gemm_i8": lowbit_gemm_i8,
    "binary_gemm": binary_gemm,
    "binary_conv2d": binary_conv2d,
    "binary_conv2d_fused": binary_conv2d_fused,
}
