"""The low-bit ``torch.ops.qtool`` operators: packing, int4/int3 and binary GEMM/conv.

Importing this module loads the one op library (``qtool.native.library``: the compiled kernels,
or, after one notice line, the pure-PyTorch reference in ``reference``), so callers use
``torch.ops.qtool.*`` either way; ``backend()`` tells which one runs. Fake (meta)
implementations are registered for both, so ``torch.compile`` and ``torch.export`` trace
through the ops.
"""

from __future__ import annotations

import torch

from qtool.lowbit import reference
from qtool.native import library

# Must match kernels/registration.cpp (tests/kernels/test_ops.py compares them).
SCHEMAS = {
    "pack_int4": "pack_int4(Tensor codes) -> Tensor",
    "unpack_int4": "unpack_int4(Tensor packed, int K) -> Tensor",
    "pack_int3": "pack_int3(Tensor codes) -> Tensor",
    "unpack_int3": "unpack_int3(Tensor packed, int K) -> Tensor",
    "pack_binary": "pack_binary(Tensor x) -> Tensor",
    "unpack_binary": "unpack_binary(Tensor bits, int K) -> Tensor",
    "quantize_rows_i8": "quantize_rows_i8(Tensor x) -> (Tensor, Tensor)",
    "lowbit_gemm": "lowbit_gemm(Tensor x, Tensor w, Tensor scale, int bits, int K, int group_size) -> Tensor",
    "lowbit_gemm_i8": "lowbit_gemm_i8(Tensor xq, Tensor x_scale, Tensor w, Tensor scale, int bits, int K, "
                      "int group_size) -> Tensor",
    "binary_gemm": "binary_gemm(Tensor a, Tensor w, int K, Tensor? scale=None) -> Tensor",
    "binary_conv2d": "binary_conv2d(Tensor x, Tensor w, int in_channels, int[2] kernel_size, int[2] stride, "
                     "int[2] padding, int[2] dilation, Tensor? scale=None) -> Tensor",
    "binary_conv2d_fused": "binary_conv2d_fused(Tensor x, Tensor w, int in_channels, int[2] kernel_size, "
                           "int[2] stride, int[2] padding, int[2] dilation, Tensor? scale, Tensor? bias, "
                           "bool relu_first, Tensor? post_scale, Tensor? post_shift, Tensor? residual, "
                           "bool relu_last) -> Tensor",
}


def _blocks(K):
    return -(-K // 64)


def conv_output_shape(x, w, kernel_size, stride, padding, dilation) -> torch.Size:
    """[N, O, OH, OW] of a binary conv of ``x`` [N, C, H, W] with packed weights ``w`` [O, ...]."""
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return torch.Size([x.shape[0], w.shape[0], *size])


def _conv_output(x, w, kernel_size, stride, padding, dilation) -> torch.Tensor:
    return torch.empty(conv_output_shape(x, w, kernel_size, stride, padding, dilation), dtype=torch.float32,
                       device=x.device, memory_format=torch.channels_last)


def _register_fakes() -> None:
    def fake(name):
        return torch.library.register_fake(f"qtool::{name}")

    @fake("pack_int4")
    def _(codes):
        return codes.new_empty((codes.shape[0], _blocks(codes.shape[1]) * 32), dtype=torch.uint8)

    @fake("pack_int3")
    def _(codes):
        return codes.new_empty((codes.shape[0], _blocks(codes.shape[1]) * 24), dtype=torch.uint8)

    @fake("unpack_int4")
    def _(packed, K):
        return packed.new_empty((packed.shape[0], K), dtype=torch.int8)

    @fake("unpack_int3")
    def _(packed, K):
        return packed.new_empty((packed.shape[0], K), dtype=torch.int8)

    @fake("pack_binary")
    def _(x):
        return x.new_empty((x.shape[0], _blocks(x.shape[1])), dtype=torch.int64)

    @fake("unpack_binary")
    def _(bits, K):
        return bits.new_empty((bits.shape[0], K), dtype=torch.float32)

    @fake("quantize_rows_i8")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @fake("lowbit_gemm")
    def _(x, w, scale, bits, K, group_size):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @fake("lowbit_gemm_i8")
    def _(xq, x_scale, w, scale, bits, K, group_size):
        return xq.new_empty((xq.shape[0], w.shape[0]), dtype=torch.float32)

    @fake("binary_gemm")
    def _(a, w, K, scale=None):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.float32)

    @fake("binary_conv2d")
    def _(x, w, in_channels, kernel_size, stride, padding, dilation, scale=None):
        return _conv_output(x, w, kernel_size, stride, padding, dilation)

    @fake("binary_conv2d_fused")
    def _(x, w, in_channels, kernel_size, stride, padding, dilation, scale, bias, relu_first, post_scale, post_shift,
          residual, relu_last):
        return _conv_output(x, w, kernel_size, stride, padding, dilation)


def backend() -> str:
    """``"extension"`` (compiled kernels) or ``"reference"`` (pure PyTorch)."""
    return library.load()


def isa() -> str:
    """The CPU instruction set the kernels run: ``avx512``, ``avx2``, ``scalar`` or ``reference``."""
    return torch.ops.qtool._cpu_isa() if backend() == "extension" else "reference"


def supported_isas() -> list[str]:
    return torch.ops.qtool._cpu_isas().split(",") if backend() == "extension" else []


def set_isa(name: str) -> str:
    """Switch the CPU kernels to ``name`` (``avx512``, ``avx2``, ``scalar``, ``auto``); for tests
    and benchmarks. ``QTOOL_KERNEL_ISA`` picks the ISA at load time."""
    if backend() != "extension":
        raise RuntimeError("the compiled kernels are not loaded; only the reference runs")
    return torch.ops.qtool._set_cpu_isa(name)


def pack_weights(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weight codes [N, K] (within the signed ``bits`` range) to the packed layout."""
    if bits == 4:
        return torch.ops.qtool.pack_int4(codes)
    if bits == 3:
        return torch.ops.qtool.pack_int3(codes)
    raise ValueError(f"packed weights are 3 or 4 bits, got {bits}")


def pack_conv_weight_binary(weight: torch.Tensor) -> torch.Tensor:
    """Signs of conv weights [O, C, kh, kw] packed in the K order of ``binary_conv2d``."""
    return torch.ops.qtool.pack_binary(reference.binary_weight_order(weight).float().contiguous())


library.register(SCHEMAS, reference.OPS)
_register_fakes()
