"""LSQ fake quantization as one torch op, ``torch.ops.qtool.lsq_fake_quant``, with its backward
registered: the fused C++ kernel (``kernels/cpu/fake_quant.cpp``) for CPU float32/float64, the
pure-PyTorch reference below on other devices and wherever the op library cannot be loaded.
Both compute the same numbers (tests check it):

    forward   y = round(clamp(x / s, qmin, qmax)) * s
    backward  dy/dx = 1 inside [qmin, qmax] (straight-through rounding), 0 outside
              dy/ds = round(x/s) - x/s inside, qmin or qmax outside, times the LSQ factor

One op with its own backward rather than autograd through detach() tricks, because autograd
would otherwise save and sweep the activation tensor six or seven times; the quantizers
dominated step time.
"""

from __future__ import annotations

import torch

from qtool.native import library

# Must match kernels/registration.cpp (tests/kernels/test_ops.py compares them).
SCHEMAS = {
    "lsq_fake_quant": "lsq_fake_quant(Tensor x, Tensor scale, float qmin, float qmax, float grad_factor) -> Tensor",
    "lsq_fake_quant_backward": "lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, float qmin, float qmax, "
                               "float grad_factor) -> (Tensor, Tensor)",
}


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, factor: float) -> torch.Tensor:
    """``round(clamp(x / scale, qmin, qmax)) * scale``; ``factor`` multiplies the step size's
    gradient. ``scale`` has one element, or one per ``x.size(0)`` (output channels)."""
    return torch.ops.qtool.lsq_fake_quant(x, scale, float(qmin), float(qmax), float(factor))


# -- the pure-PyTorch reference -------------------------------------------------------------------
def kernel_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the training kernels compute in and return (``kernels/include/training_layout.h``):
    channels-last stays, anything else becomes contiguous, so each output channel is one block."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale.reshape((-1,) + (1,) * (x.dim() - 1)) if scale.numel() > 1 else scale


def reference_forward(x, scale, qmin: float, qmax: float, grad_factor: float) -> torch.Tensor:
    x = x.contiguous(memory_format=kernel_layout(x))
    step = _broadcast(scale, x)
    return torch.clamp(x / step, qmin, qmax).round_() * step


def reference_backward(grad, x, scale, qmin: float, qmax: float, grad_factor: float):
    layout = kernel_layout(x)
    x, grad = x.contiguous(memory_format=layout), grad.contiguous(memory_format=layout)
    v = x / _broadcast(scale, x)
    inside = (v >= qmin) & (v <= qmax)
    grad_x = grad * inside
    step_term = torch.where(inside, v.round() - v, torch.clamp(v, qmin, qmax)) * grad
    if scale.numel() > 1:
        grad_s = step_term.sum(dim=tuple(range(1, x.dim())), dtype=torch.float64)
    else:
        grad_s = step_term.sum(dtype=torch.float64).reshape(1)
    return grad_x, (grad_s * grad_factor).to(scale.dtype).reshape(scale.shape)


# -- registration: kernels, fake kernels, autograd ------------------------------------------------
library.register(SCHEMAS, {"lsq_fake_quant": reference_forward, "lsq_fake_quant_backward": reference_backward})


@torch.library.register_fake("qtool::lsq_fake_quant")
def _(x, scale, qmin, qmax, grad_factor):
    return torch.empty_like(x.contiguous(memory_format=kernel_layout(x)))


@torch.library.register_fake("qtool::lsq_fake_quant_backward")
def _(grad, x, scale, qmin, qmax, grad_factor):
    return torch.empty_like(x.contiguous(memory_format=kernel_layout(x))), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, scale, qmin, qmax, grad_factor = inputs
    ctx.save_for_backward(x, scale)
    ctx.grid = (qmin, qmax, grad_factor)


def _backward(ctx, grad):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale = torch.ops.qtool.lsq_fake_quant_backward(grad, x, scale, *ctx.grid)
    return grad_x, grad_scale, None, None, None


torch.library.register_autograd("qtool::lsq_fake_quant", _backward, setup_context=_setup_context)
