"""The integer view of a quantized conv/linear layer: what a deployed integer kernel computes.

    y = (sum(x_code * w_code) + bias_code) * unit,   unit = input_step * weight_step (per channel)

One function works it out, with a following batch norm folded in (its factor goes into the
per-channel weight step, a negative factor into the codes' sign; its shift into the bias), for
every reader: the layer's own eval forward (so that PyTorch computes the deployed numbers), the
ONNX exporter and the kernel runtime. onnxruntime's QLinearConv/QGemm take the bias as int32 in
units of ``float32(input_step) * float32(weight_step)``; rounding it there is the one place an
integer kernel differs from float arithmetic, so the trained model rounds it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
