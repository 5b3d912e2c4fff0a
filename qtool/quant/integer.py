"""The integer view of a quantized conv/linear layer: what a deployed integer kernel computes.

    y = (sum(x_code * w_code) + bias_code) * unit,   unit = input_step * weight_step (per channel)

One function works it out, with a following batch norm folded in (its factor goes into the
per-channel weight step, a negative factor into the codes' sign; its shift into the bias), for
every reader: the layer's own eval forward (so that PyTorch computes the deployed numbers), the
ONNX exporter and the kernel runtime. onnxruntime's QLinearConv/QGemm take the bias as int32 in
units of ``float32(input_step) * float32(weight_step)``; rounding it there is the one place an
integer kernel differs from float arithmetic, so the trained model rounds it the same way.

The sum or product of two quantized tensors read by a third quantizer (a residual join, a
squeeze-excitation gate) is the other: ``IntegerAdd`` / ``IntegerMul`` compute it in eval mode as
onnxruntime's QLinearAdd / QLinearMul do. QLinearAdd is the one kernel whose arithmetic differs
by CPU (float32 with fmas on x86 with AVX2, without them on older x86, fixed point on ARM): eval
mode reproduces the first, ``joins_computed_as(model, "x86-sse2" | "arm")`` the others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class IntegerLayer:
    codes: torch.Tensor                # int32, the weight's shape; a negative BN factor flips a channel's sign
    weight_step: torch.Tensor          # float64 [out], positive
    lo: int                            # the weight grid the codes live on
    hi: int
    bias: torch.Tensor | None          # float64 [out], batch norm's shift included; None: no bias
    bias_codes: torch.Tensor | None    # int32 [out] in accumulator units; None without an input step
    unit: torch.Tensor | None          # float32 [out]: float32(input_step) * float32(weight_step)


def batchnorm_affine(bn: torch.nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``x * mul + add`` per channel, in float64."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.affine else torch.ones_like(mean)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(mean)
    mul = weight / torch.sqrt(var + bn.eps)
    return mul, shift - mean * mul


def folded_affine(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-channel factor or None, float64 bias or None) of ``layer`` with its folded batch norm."""
    bias = None if layer.bias is None else layer.bias.detach().double()
    bn = getattr(layer, "bn", None)
    if bn is None:
        return None, bias
    mul, add = batchnorm_affine(bn)
    return mul, add if bias is None else mul * bias + add


def integer_bias(bias: torch.Tensor, input_step: torch.Tensor, weight_step: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 codes, float32 unit): ``bias`` rounded (half to even) to accumulator units."""
    unit = input_step.detach().abs().float().reshape(()) * weight_step.float()
    codes = torch.round(bias / unit.double()).clamp(INT32_MIN, INT32_MAX).to(torch.int32)
    return codes, unit


@torch.no_grad()
def integer_layer(layer, input_step: torch.Tensor | None = None) -> IntegerLayer:
    """The integer view of a ``QuantConv2d``/``QuantLinear`` (``input_step``: its input's step,
    when the input is quantized; the bias is then in accumulator units too)."""
    quantizer = layer.weight_quantizer
    step = quantizer.scale.detach().abs().reshape(-1).double()
    if step.numel() == 1:
        step = step.expand(layer.weight.shape[0])
    codes = quantizer.quantize_int(layer.weight.detach())
    # A negative learned step mirrors the codes; the grid is symmetric (narrow) so they stay on it.
    sign = torch.sign(quantizer.scale.detach().reshape(-1))
    lo, hi = quantizer.qmin, quantizer.qmax
    mul, bias = folded_affine(layer)
    if mul is not None:
        sign = sign * torch.where(mul < 0, -1.0, 1.0).to(sign)
        step = step * torch.where(mul == 0, 1.0, mul.abs())  # gamma = 0: the channel is its bias
        codes = codes * (mul != 0).reshape((-1,) + (1,) * (codes.dim() - 1)).to(codes)
    if bool((sign < 0).any()):
        codes = codes * sign.to(codes).reshape((-1,) + (1,) * (codes.dim() - 1))
        widest = max(-lo, hi)
        lo, hi = -widest, widest
    bias_codes = unit = None
    if bias is not None and input_step is not None:
        bias_codes, unit = integer_bias(bias, input_step, step)
    return IntegerLayer(codes.to(torch.int32), step, lo, hi, bias, bias_codes, unit)


def deployed_output(layer, x: torch.Tensor, input_step: torch.Tensor,
                    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    output_step: torch.Tensor | None = None) -> torch.Tensor:
    """What the integer kernel outputs for the quantized input ``x`` (eval mode of a graph-
    prepared layer): integer codes summed exactly, then ``(sum + bias_code) * unit``. Inference
    only: no gradient flows through it (training mode runs the float path).

    ``compute(x, w)`` is the layer's conv/linear. The sums are exact because they add integers:
    in float32 while no partial sum can pass 2**24, in float64 beyond. (Summing the float values
    instead would round every partial sum, and in a 4-bit network each resulting flip at a
    rounding boundary moves later layers by whole steps.)"""
    if not bool(layer.weight_quantizer.initialized):  # a model evaluated before any training step
        layer.weight_quantizer.initialize(layer.weight.detach())
    view = integer_layer(layer, input_step)
    unit = view.unit if view.unit is not None else (
        input_step.detach().abs().float().reshape(()) * view.weight_step.float())
    codes = torch.round(x.detach() / input_step.detach().abs().reshape(()))
    bound = float(codes.abs().amax()) * float(view.codes.abs().amax()) * view.codes[0].numel()
    exact = torch.float32 if bound + (0 if view.bias_codes is None else float(view.bias_codes.abs().amax())) < 2**24 \
        else torch.float64
    accumulator = compute(codes.to(exact), view.codes.to(exact))
    shape = (1, -1) + (1,) * (accumulator.dim() - 2)
    if view.bias_codes is not None:
        accumulator = accumulator + view.bias_codes.to(exact).reshape(shape)
    total = accumulator.float()  # the kernel's int32 -> float32 conversion
    if output_step is not None:
        # Requantization as QLinearConv/QGemm do it: one float32 multiplier per channel,
        # float32(unit / output step), rounded half to even; the tensor quantizer after this
        # layer then finds its codes exactly (its clamp still applies).
        out = output_step.detach().abs().float().reshape(())
        multiplier = (unit.float() / out).reshape(shape)
        return (torch.round(total * multiplier) * out).to(x.dtype)
    return (total * unit.float().reshape(shape)).to(x.dtype)


# -- the joins: adds and products of two quantized tensors -------------------------------------

def float32_step(step) -> torch.Tensor:
    """A quantizer's step as the deployed graph holds it: float32 |scale|, a scalar."""
    return torch.as_tensor(step, dtype=torch.float32).detach().abs().reshape(())


def container_zero_point(signed) -> int:
    """The zero point of an LSQ grid's codes in the uint8 container the exporter writes (a signed
    grid's codes are shifted by 128: ``exporters.ir.Grid.as_uint8``)."""
    return 128 if bool(signed) else 0


def qlinear_add_constants(step_a, step_b, step_out, zero_a: int, zero_b: int, zero_out: int):
    """QLinearAdd's three float32 constants: ScaleA / ScaleC, ScaleB / ScaleC and the fixed part
    ZeroPointC - (ratio_a * ZeroPointA + ratio_b * ZeroPointB), each one float32 operation."""
    a, b, out = (float32_step(v) for v in (step_a, step_b, step_out))
    ratio_a, ratio_b = a / out, b / out
    fixed = torch.tensor(float(zero_out), dtype=torch.float32) - (ratio_a * zero_a + ratio_b * zero_b)
    return ratio_a, ratio_b, fixed


def qlinear_add_codes(codes_a: torch.Tensor, codes_b: torch.Tensor, ratio_a, ratio_b, fixed) -> torch.Tensor:
    """The uint8-container output codes of onnxruntime's QLinearAdd (MLAS, x86 AVX2 and newer:
    ``fma(a, ratio_a, fma(b, ratio_b, fixed))``, rounded half to even, saturated to [0, 255]),
    as float32, from the operands' container codes. Each fma is one float64 multiply-add rounded to
    float32, which is the fused result: the product of an 8-bit code and a float32 ratio and the
    sum with a float32 addend need at most 53 bits while the ratios lie within 2^-20..2^8 of each
    other and of 1 (steps of one network do)."""
    inner = (codes_b.double() * ratio_b.double() + fixed.double()).float()
    total = (codes_a.double() * ratio_a.double() + inner.double()).float()
    return torch.clamp(torch.round(total), 0, 255)


def qlinear_add_codes_sse2(codes_a: torch.Tensor, codes_b: torch.Tensor, ratio_a, ratio_b, fixed) -> torch.Tensor:
    """QLinearAdd's codes on x86 CPUs without AVX2 (MLAS's SSE2 kernel): the same float32
    arithmetic as ``qlinear_add_codes`` with every multiply and add rounded on its own,
    ``(fixed + a * ratio_a) + b * ratio_b``, rounded half to even, saturated; as float32."""
    total = (fixed + codes_a.float() * ratio_a) + codes_b.float() * ratio_b
    return torch.clamp(torch.round(total), 0, 255)


def _neon_fixed_point(ratio_a: float, ratio_b: float) -> tuple[int, int, int] | None:
    """MLAS's NEON QLinearAdd parameters: (shift, multiplier_a, multiplier_b), the larger ratio
    times 2**shift rounded to an integer in [2**21, 2**22); None where MLAS falls back to float."""
    ratios = np.array([ratio_a, ratio_b], np.float32)
    if ((ratios < 2.0**-14) | (ratios >= 256.0)).any():
        return None
    exponent = int(ratios.max().view(np.int32) >> 23) - 127
    shift = 21 - exponent
    if not 13 <= shift <= 31:
        return None
    multipliers = np.rint(ratios * np.float32(2.0**shift)).astype(np.int64)  # lrintf: half to even
    if multipliers.max() >= 2**22 or multipliers.max() < 2**21:
        return None
    return shift, int(multipliers[0]), int(multipliers[1])


def qlinear_add_codes_neon(codes_a: torch.Tensor, codes_b: torch.Tensor, zeros, steps) -> torch.Tensor:
    """The uint8-container output codes of onnxruntime's QLinearAdd on ARM (MLAS, NEON), as float32.

    It works in fixed point: ``(a - za) * ma + (b - zb) * mb`` in int32, with ``ma``, ``mb`` the
    float32 ratios ScaleA / ScaleC, ScaleB / ScaleC scaled by 2**shift and rounded to integers,
    then shifted right rounding half away from zero, plus ZeroPointC, saturated. Where the ratios
    leave its range it falls back to float: ``rint((sa * (a - za) + sb * (b - zb)) / sc + zc)``.
    x86 computes in float32 with fmas (``qlinear_add_codes``); the two differ on a few codes in
    10^5 (the multipliers' 22-bit precision, and ties)."""
    step_a, step_b, step_out = (float32_step(v) for v in steps)
    centered_a, centered_b = codes_a - zeros[0], codes_b - zeros[1]
    fixed = _neon_fixed_point(float(step_a / step_out), float(step_b / step_out))
    if fixed is None:
        total = (step_a * centered_a + step_b * centered_b) / step_out
        return torch.clamp(torch.round(torch.clamp(total, -zeros[2], 255 - zeros[2]) + float(zeros[2])), 0, 255)
    shift, multiplier_a, multiplier_b = fixed
    accumulator = centered_a.to(torch.int64) * multiplier_a + centered_b.to(torch.int64) * multiplier_b
    rounded = torch.div(accumulator - (accumulator < 0).to(torch.int64) + 2 ** (shift - 1), 2**shift,
                        rounding_mode="floor")
    return torch.clamp(rounded + zeros[2], 0, 255).float()


def qlinear_add_codes_on(kernels: str, codes_a: torch.Tensor, codes_b: torch.Tensor, zeros, steps) -> torch.Tensor:
    """QLinearAdd's container codes as onnxruntime computes them on ``kernels`` CPUs (JOIN_KERNELS)."""
    if kernels == "arm":
        return qlinear_add_codes_neon(codes_a, codes_b, zeros, steps)
    constants = qlinear_add_constants(*steps, *zeros)
    if kernels == "x86-sse2":
        return qlinear_add_codes_sse2(codes_a, codes_b, *constants)
    return qlinear_add_codes(codes_a, codes_b, *constants)


def qlinear_mul_codes(codes_a: torch.Tensor, codes_b: torch.Tensor, zeros, steps) -> torch.Tensor:
    """The uint8-container output codes of onnxruntime's QLinearMul (MLAS, x86 SSE2 kernel):
    ``rint(float32((a - za) * (b - zb)) * ratio + zc)``, ratio = float32(sa * sb) / sc, the multiply
    and the add rounded separately, saturated to [0, 255]; as float32."""
    step_a, step_b, step_out = (float32_step(v) for v in steps)
    ratio = step_a * step_b / step_out
    product = ((codes_a - zeros[0]) * (codes_b - zeros[1])).float()  # integers below 2^17: exact
    return torch.clamp(torch.round(product * ratio + float(zeros[2])), 0, 255)


class IntegerJoin(nn.Module):
    """An op of two tensors on LSQ grids whose result a third quantizer reads (through clamps).

    Training: the float op, as before (LSQ's gradients flow through it). Eval mode, once the three
    quantizers are initialised: what the deployed integer kernel computes from the codes
    (``deployed_codes``; ``a`` is its first operand), on the output grid, so the quantizer after it
    finds exactly the deployed codes. The float op on two fake-quantized tensors differs from it at
    rounding boundaries, and at 8-bit activations often enough to move the logits of a deep
    network. ``steps``/``signed``/``ready``: the three quantizers' ``scale``, ``signed_flag`` and
    ``initialized`` (operand a, operand b, output). Subclasses name the two computations."""

    float_op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # training: the float op
    deployed_codes: Callable[..., torch.Tensor]  # (codes_a, codes_b, zeros, steps) -> container codes
    kernels = "x86"  # whose onnxruntime kernels eval mode reproduces (JOIN_KERNELS)

    def forward(self, a: torch.Tensor, b: torch.Tensor, steps=None, signed=None, ready=None) -> torch.Tensor:
        if self.training or steps is None or not all(bool(flag) for flag in ready):
            return self.float_op(a, b)
        zeros = [container_zero_point(flag) for flag in signed]
        codes = [torch.round(x.detach() / float32_step(step)) + zero for x, step, zero in zip((a, b), steps, zeros)]
        out = self.deployed_codes(*codes, zeros, steps)
        return ((out - zeros[2]) * float32_step(steps[2])).to(a.dtype)


class IntegerAdd(IntegerJoin):
    """A residual join: in eval mode the sum onnxruntime's QLinearAdd computes, as on x86 with
    AVX2 (``qlinear_add_codes``) or, inside ``joins_computed_as``, as on another CPU family."""

    float_op = staticmethod(torch.add)

    def deployed_codes(self, codes_a, codes_b, zeros, steps):
        return qlinear_add_codes_on(self.kernels, codes_a, codes_b, zeros, steps)


class IntegerMul(IntegerJoin):
    """A product of codes (squeeze-excitation's x * gate): in eval mode QLinearMul's
    (``qlinear_mul_codes``; ARM's computes the same codes)."""

    float_op = staticmethod(torch.mul)
    deployed_codes = staticmethod(qlinear_mul_codes)


# Whose QLinearAdd eval mode reproduces: x86 with AVX2 (fmas; the default), x86 without AVX2
# (MLAS's SSE2 kernel), ARM (NEON, fixed point). QLinearMul's codes are the same on all three.
JOIN_KERNELS = ("x86", "x86-sse2", "arm")


@contextlib.contextmanager
def joins_computed_as(model: nn.Module, kernels: str):
    """Within the block, every join of ``model`` computes its eval-mode codes as onnxruntime's
    kernels on ``kernels`` CPUs do: the trained model as deployed there. Training is unaffected
    (joins train with the float op)."""
    if kernels not in JOIN_KERNELS:
        raise ValueError(f"kernels must be one of {JOIN_KERNELS}, got {kernels!r}")
    joins = [module for module in model.modules() if isinstance(module, IntegerJoin)]
    previous = [join.kernels for join in joins]
    try:
        for join in joins:
            join.kernels = kernels
        yield model
    finally:
        for join, before in zip(joins, previous):
            join.kernels = before
