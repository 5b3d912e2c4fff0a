"""LSQ fake quantization as one autograd function: a fused C++ kernel when it is available,
the pure-PyTorch reference otherwise. Both compute the same numbers (tests check it):

    forward   y = round(clamp(x / s, qmin, qmax)) * s
    backward  dy/dx = 1 inside [qmin, qmax] (straight-through rounding), 0 outside
              dy/ds = round(x/s) - x/s inside, qmin or qmax outside, times the LSQ factor

Written as a custom function rather than with detach() tricks because autograd would otherwise
save and sweep the activation tensor six or seven times; the quantizers dominated step time.
"""

from __future__ import annotations

import torch

from qtool.extensions import load_extension

_EXTENSION = "qtool_fake_quant"
SOURCES = ("cpu/fake_quant.cpp",)  # under kernels/


def _fused():
    return load_extension(_EXTENSION, list(SOURCES), extra_cflags=["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"])


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale.reshape((-1,) + (1,) * (x.dim() - 1)) if scale.numel() > 1 else scale


class ReferenceLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin: float, qmax: float, factor: float):
        ctx.save_for_backward(x, scale)
        ctx.grid = (qmin, qmax, factor)
        return torch.clamp(x / _broadcast(scale, x), qmin, qmax).round_() * _broadcast(scale, x)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        qmin, qmax, factor = ctx.grid
        v = x / _broadcast(scale, x)
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad * inside
        step_term = torch.where(inside, v.round() - v, torch.clamp(v, qmin, qmax)) * grad
        if scale.numel() > 1:
            grad_s = step_term.sum(dim=tuple(range(1, x.dim())), dtype=torch.float64)
        else:
            grad_s = step_term.sum(dtype=torch.float64).reshape(1)
        return grad_x, (grad_s * factor).to(scale.dtype).reshape(scale.shape), None, None, None


class FusedLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin: float, qmax: float, factor: float):
        ctx.save_for_backward(x, scale)
        ctx.grid = (qmin, qmax, factor)
        return _fused().lsq_forward(x, scale, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        qmin, qmax, factor = ctx.grid
        grad_x, grad_s = _fused().lsq_backward(grad, x, scale, qmin, qmax, factor)
        return grad_x, grad_s.reshape(scale.shape), None, None, None


def _can_fuse(x: torch.Tensor, scale: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or scale.dtype != torch.float32:
        return False
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    return _fused() is not None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, factor: float) -> torch.Tensor:
    function = FusedLSQ if _can_fuse(x, scale) else ReferenceLSQ
    return function.apply(x, scale, float(qmin), float(qmax), float(factor))
