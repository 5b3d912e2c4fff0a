"""The fused integer layer ops, ``torch.ops.qtool.fused_conv2d`` / ``fused_linear``: schemas, the
pure-PyTorch reference (the kernel wherever the compiled library is not loaded, and the tests'
oracle) and the fake kernels (``torch.compile``, ``torch.export``, ``opcheck``).

One op is one quantized conv/linear of a graph-prepared model with what follows it, in integers
(``kernels/cpu/fused_layer.cpp``)::

    acc = sum_k x_code * w_code                       exact (float64 sums of integers here)
    T   = float32(acc + bias_code)                    the int -> float conversion
    y   = T * unit                                    unit = float32(input_step) * float32(weight_step)
      or, with ``multiplier`` = float32(unit / out_step) (requantization as QLinearConv does it):
          y = round(T * multiplier) * out_step
    y   = clamp(y, *clamp)                            ReLU / ReLU6 / Hardtanh, or (-inf, inf)
    q   = round(clamp(y / out_step, *out_range))      the tensor quantizer after the layer
    residual:  u = QLinearAdd's codes of (q, r), or of (r, q) with residual_first
                   (qtool.quant.integer.qlinear_add_codes, on uint8-container codes)
               z = clamp((u - zero_point) * add_step, *add_clamp)
               q = round(clamp(z / add_step, *add_range))

``out_step == 0`` returns ``y`` (float32, the logits). Rounding is half to even. Each float step
is one float32 operation in the order the graph-prepared model's eval forward computes it
(``qtool.quant.integer.deployed_output``, with the multiplier when the graph passes the layer its
output step; then LSQ's ``x / s``, clamp, round, ``* s`` and the add of the model's
``IntegerAdd``), so the compiled kernel and this reference agree bit for bit and both reproduce the
model's codes and logits.

Layouts: conv codes are [N, C, H, W] in channels-last memory (any layout is accepted), int8 for
a signed grid and uint8 for an unsigned one (``codes_dtype``; every LSQ grid up to 8 bits fits);
K runs (tap row, tap column, channel). Weights: ``bits`` 3 or 4, packed rows
(``qtool.lowbit.ops.pack_weights``, int8 input codes only: the library's int4/int3 tiles);
``bits`` 8, int8 codes of any width in "lanes" panels ``[ceil(out/16), ceil(K/4), 16, 4]``
(``lanes_weights``; 16 output channels in the vector lanes, zero-padded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtool.lowbit import reference
from qtool.quant.integer import container_zero_point, qlinear_add_codes, qlinear_add_constants
from qtool.native import library

# Must match kernels/registration.cpp (tests/kernels/test_fused.py compares them).
SCHEMAS = {
    "fused_conv2d": "fused_conv2d(Tensor x, Tensor w, Tensor bias, Tensor unit, Tensor? multiplier, int bits, "
                    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, float[] clamp, "
                    "float out_step, int[] out_range, Tensor? residual, float residual_step, float[] add_clamp, "
                    "float add_step, int[] add_range, bool residual_first=False) -> Tensor",
    "fused_linear": "fused_linear(Tensor x, Tensor w, Tensor bias, Tensor unit, Tensor? multiplier, int bits, "
                    "float[] clamp, float out_step, int[] out_range, Tensor? residual, float residual_step, "
                    "float[] add_clamp, float add_step, int[] add_range, bool residual_first=False) -> Tensor",
}

NO_CLAMP = (-math.inf, math.inf)


def codes_dtype(qmin: int, qmax: int) -> torch.dtype:
    """uint8 for an unsigned grid within [0, 255], int8 for a signed one within [-128, 127]."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    torch._check(-128 <= qmin and qmax <= 127, lambda: f"[{qmin}, {qmax}] fits neither int8 nor uint8 codes")
    return torch.int8


def output_dtype(out_step: float, out_range, residual, add_range) -> torch.dtype:
    """float32 for a float output, else the final grid's codes dtype."""
    if out_step == 0:
        return torch.float32
    return codes_dtype(*(add_range if residual is not None else out_range))


LANES = 16  # output channels per panel of the bits=8 weights


def lanes_weights(codes: torch.Tensor) -> torch.Tensor:
    """Integer weight codes [out, K] (within int8) as the lanes panels [ceil(out/16), ceil(K/4), 16, 4]."""
    out, K = codes.shape
    padded = torch.zeros(-(-out // LANES) * LANES, -(-K // 4) * 4, dtype=torch.int8, device=codes.device)
    padded[:out, :K] = codes.to(torch.int8)
    return padded.reshape(-1, LANES, padded.shape[1] // 4, 4).permute(0, 2, 1, 3).contiguous()


def lanes_codes(w: torch.Tensor, out: int, K: int) -> torch.Tensor:
    """The inverse of ``lanes_weights``: codes [out, K]."""
    return w.permute(0, 2, 1, 3).reshape(w.shape[0] * LANES, w.shape[1] * 4)[:out, :K]


def weight_codes(w: torch.Tensor, bits: int, out: int, K: int) -> torch.Tensor:
    """Weight codes [out, K] as int64, from the packed rows (3, 4 bits) or the lanes panels (8)."""
    if bits == 8:
        return lanes_codes(w, out, K).to(torch.int64)
    torch._check(bits in (3, 4), lambda: f"bits must be 3, 4 or 8, got {bits}")
    return (reference.unpack_int4(w, K) if bits == 4 else reference.unpack_int3(w, K)).to(torch.int64)


def epilogue(acc: torch.Tensor, bias, unit, multiplier, clamp, out_step, out_range, residual, residual_step,
             add_clamp, add_step, add_range, residual_first=False) -> torch.Tensor:
    """The integer accumulator [M, N] or [N, C, H, W] (int64) to the op's output."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    t = (acc + bias.to(torch.int64).reshape(shape)).to(torch.float32)
    if multiplier is not None:
        torch._check(out_step != 0, lambda: "a multiplier needs a quantized output (out_step > 0)")
        y = torch.round(t * multiplier.reshape(shape)) * out_step
    else:
        y = t * unit.reshape(shape)
    y = torch.clamp(y, clamp[0], clamp[1])
    if out_step == 0:
        torch._check(residual is None, lambda: "a residual needs a quantized output (out_step > 0)")
        return y
    q = torch.clamp(y / out_step, out_range[0], out_range[1]).round()
    if residual is not None:
        zeros = [container_zero_point(out_range[0] < 0), container_zero_point(residual.dtype == torch.int8),
                 container_zero_point(add_range[0] < 0)]
        operands = [(q + zeros[0], out_step, zeros[0]), (residual.to(torch.float32) + zeros[1], residual_step, zeros[1])]
        (a, step_a, zero_a), (b, step_b, zero_b) = operands[::-1] if residual_first else operands
        ratio_a, ratio_b, fixed = qlinear_add_constants(step_a, step_b, add_step, zero_a, zero_b, zeros[2])
        u = qlinear_add_codes(a, b, ratio_a, ratio_b, fixed)
        z = torch.clamp((u - zeros[2]) * torch.tensor(add_step, dtype=torch.float32), add_clamp[0], add_clamp[1])
        q = torch.clamp(z / add_step, add_range[0], add_range[1]).round()
    return q.to(output_dtype(out_step, out_range, residual, add_range))


def fused_conv2d(x, w, bias, unit, multiplier, bits, kernel_size, stride, padding, dilation, clamp, out_step,
                 out_range, residual, residual_step, add_clamp, add_step, add_range, residual_first=False):
    kh, kw = kernel_size
    C = x.shape[1]
    codes = weight_codes(w, bits, bias.shape[0], C * kh * kw)
    codes = codes.reshape(codes.shape[0], kh, kw, C).permute(0, 3, 1, 2)
    # float64 sums of integers are exact (|acc| < 2^53 by far), whatever the summation order
    acc = F.conv2d(x.contiguous().to(torch.float64), codes.to(torch.float64), stride=list(stride),
                   padding=list(padding), dilation=list(dilation)).to(torch.int64)
    out = epilogue(acc, bias, unit, multiplier, clamp, out_step, out_range, residual, residual_step, add_clamp,
                   add_step, add_range, residual_first)
    return out.contiguous(memory_format=torch.channels_last)


def fused_linear(x, w, bias, unit, multiplier, bits, clamp, out_step, out_range, residual, residual_step, add_clamp,
                 add_step, add_range, residual_first=False):
    codes = weight_codes(w, bits, bias.shape[0], x.shape[1])
    acc = (x.to(torch.float64) @ codes.to(torch.float64).T).to(torch.int64)
    return epilogue(acc, bias, unit, multiplier, clamp, out_step, out_range, residual, residual_step, add_clamp,
                    add_step, add_range, residual_first).contiguous()


OPS = {"fused_conv2d": fused_conv2d, "fused_linear": fused_linear}


def _register_fakes() -> None:
    @torch.library.register_fake("qtool::fused_conv2d")
    def _(x, w, bias, unit, multiplier, bits, kernel_size, stride, padding, dilation, clamp, out_step, out_range,
          residual, residual_step, add_clamp, add_step, add_range, residual_first=False):
        size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                for i in range(2)]
        return torch.empty((x.shape[0], bias.shape[0], *size), device=x.device,
                           dtype=output_dtype(out_step, out_range, residual, add_range),
                           memory_format=torch.channels_last)

    @torch.library.register_fake("qtool::fused_linear")
    def _(x, w, bias, unit, multiplier, bits, clamp, out_step, out_range, residual, residual_step, add_clamp,
          add_step, add_range, residual_first=False):
        return x.new_empty((x.shape[0], bias.shape[0]), dtype=output_dtype(out_step, out_range, residual, add_range))


library.register(SCHEMAS, OPS)
_register_fakes()
