"""The binary sign with STE/ReSTE gradients as one torch op, ``torch.ops.qtool.reste_sign``, with
its backward registered: the fused C++ kernel (``kernels/cpu/sign_estimator.cpp``) for CPU
float32/float64, the pure-PyTorch reference below on other devices and wherever the op library
cannot be loaded. Both compute the same numbers (tests check it).

Forward ``binary_sign``; backward ``reste_gradient`` (Wu et al., ICCV 2023): the derivative of
``f(z) = sign(z) |z|^(1/o)``, 0 beyond ``t`` and the secant slope below ``m``. ``o = 1, t = 1``
is the STE; ``power_function`` is that ``f``. The layers that use the op (and ``BinaryEstimator``,
which holds ``o``, ``t`` and ``m``) live in ``qtool.quant.binary``.
"""

from __future__ import annotations

import torch

from qtool.native import library
from qtool.quant.fake_quant import kernel_layout

# Must match kernels/registration.cpp (tests/kernels/test_ops.py compares them).
SCHEMAS = {
    "reste_sign": "reste_sign(Tensor z, float o, float t, float m) -> Tensor",
    "reste_sign_backward": "reste_sign_backward(Tensor grad, Tensor z, float o, float t, float m) -> Tensor",
}


def sign_with_estimator(z: torch.Tensor, o: float, t: float, m: float) -> torch.Tensor:
    """``binary_sign(z)``, whose gradient is ``reste_gradient(z, o, t, m)``."""
    return torch.ops.qtool.reste_sign(z, float(o), float(t), float(m))


def binary_sign(z: torch.Tensor) -> torch.Tensor:
    """+1 where ``z >= 0`` (zero included), -1 elsewhere; same dtype and layout as ``z``."""
    return torch.ones_like(z).masked_fill_(z < 0, -1.0)


def power_function(z: torch.Tensor, o: float) -> torch.Tensor:
    """ReSTE's equivalent forward ``sign(z) |z|^(1/o)`` (identity at ``o = 1``)."""
    return binary_sign(z) * z.abs().pow(1.0 / o)


def reste_gradient(z: torch.Tensor, o: float, t: float, m: float) -> torch.Tensor:
    """d sign(z)/dz as ReSTE estimates it, element-wise, in ``z``'s layout."""
    magnitude = z.abs()
    gradient = magnitude.clamp_min(m).pow_((1.0 - o) / o).div_(o)
    gradient.masked_fill_(magnitude < m, m ** ((1.0 - o) / o))
    return gradient.masked_fill_(magnitude > t, 0.0)


# -- the pure-PyTorch reference, laid out as the kernel lays its outputs out ----------------------
def _laid_out(z: torch.Tensor) -> torch.Tensor:
    return z.contiguous(memory_format=kernel_layout(z))


def reference_forward(z, o: float, t: float, m: float) -> torch.Tensor:
    return binary_sign(_laid_out(z))


def reference_backward(grad, z, o: float, t: float, m: float) -> torch.Tensor:
    return reste_gradient(_laid_out(z), o, t, m).mul_(grad)


# -- registration: kernels, fake kernels, autograd ------------------------------------------------
library.register(SCHEMAS, {"reste_sign": reference_forward, "reste_sign_backward": reference_backward})


@torch.library.register_fake("qtool::reste_sign")
def _(z, o, t, m):
    return torch.empty_like(_laid_out(z))


@torch.library.register_fake("qtool::reste_sign_backward")
def _(grad, z, o, t, m):
    return torch.empty_like(_laid_out(z))


def _setup_context(ctx, inputs, output):
    z, o, t, m = inputs
    ctx.save_for_backward(z)
    ctx.estimator = (o, t, m)


def _backward(ctx, grad):
    (z,) = ctx.saved_tensors
    return torch.ops.qtool.reste_sign_backward(grad, z, *ctx.estimator), None, None, None


torch.library.register_autograd("qtool::reste_sign", _backward, setup_context=_setup_context)
