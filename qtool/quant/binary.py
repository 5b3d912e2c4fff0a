"""Binary-network layers: ``BinaryEstimator`` (which gradient the sign gets), ``BinaryConv2d``,
``ReLUBatchNorm2d`` and ``BiRealBlock``, and ``build_plan_entry``, which turns a plan entry with a
``kind`` into one of them. Which layers a model gets, and the ``-O`` options, are planned in
``qtool.quant.binarize``; the sign op and its estimator math are ``qtool.quant.sign_estimator``.

Conventions shared with the kernels and the exporter (read them from ``BinaryConv2d``):

* ``sign(z) = +1 if z >= 0 else -1``: zero maps to +1 (LCE/QONNX ``BipolarQuant``), never to 0.
* a binary conv computes ``scale * conv(pad0(sign(x)), sign(W)) + bias``: the binarized input is
  zero-padded exactly like ``F.conv2d`` (padded taps contribute 0, not +-1), and ``scale`` is
  ``mean|W|`` of the latent weights, one value per layer (ReSTE) or per output channel.

Estimators (Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through
Estimator for Binary Neural Networks Training", ICCV 2023):

* STE: gradient 1 where ``|z| <= 1``, else 0 (BNN / larq ``ste_sign``).
* ReSTE: the backward of ``f(z) = sign(z) |z|^(1/o)``, i.e. ``(1/o) |z|^((1-o)/o)`` for
  ``m <= |z| <= t``, 0 beyond ``t`` and the secant slope ``f(m)/m = m^((1-o)/o)`` below ``m``,
  which bounds the singularity at 0. ``o = 1`` is the identity (STE); a larger ``o`` is closer to
  sign. ``qtool.train.binary`` raises ``o`` over training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import QtoolError
from qtool.quant.sign_estimator import binary_sign, sign_with_estimator

ESTIMATORS = ("ste", "reste")
STE_CLIP = 1.0


@dataclass
class BinaryEstimator:
    """Forward: ``binary_sign``. Backward: STE, or ReSTE with the current ``o`` (1 at the start)."""

    kind: str = "reste"
    o: float = 1.0
    t: float = 1.5
    m: float = 0.1

    def __post_init__(self):
        if self.kind not in ESTIMATORS:
            raise QtoolError(f"unknown binary estimator {self.kind!r}; use {' or '.join(ESTIMATORS)}")
        if not 0 < self.m < self.t:
            raise QtoolError(f"ReSTE needs 0 < m < t, got m={self.m}, t={self.t}")
        if self.o < 1:
            raise QtoolError(f"ReSTE's o must be at least 1, got {self.o}")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and z.requires_grad):
            return binary_sign(z)  # inference and export: plain torch ops that trace to ONNX
        if self.kind == "ste":  # ReSTE at o = 1 with the clip at 1 is exactly the STE
            return sign_with_estimator(z, 1.0, STE_CLIP, self.m)
        return sign_with_estimator(z, self.o, self.t, self.m)


class BinaryConv2d(nn.Conv2d):
    """A conv whose weights and inputs are binarized with ``binary_sign``.

    Interface for the exporter and the kernels (everything a deployment needs):

    * ``binary_weight()``: int8 ``+-1`` tensor ``[O, I/groups, kH, kW]``, ``sign(W)`` with sign(0) = +1;
    * ``weight_scale()``: float ``[1]`` (per layer) or ``[O]`` (``per_channel``), ``mean|W|``;
    * ``input_sign_zero = +1``: inputs are binarized with ``x >= 0 -> +1``, ``x < 0 -> -1``;
    * ``padding_value = 0.0``: the binarized input is zero-padded (``F.conv2d`` semantics);
    * output ``= weight_scale()[o] * conv(pad0(sign(x)), binary_weight())[o] + bias[o]``.

    The latent float weights stay in ``weight`` (so the state dict keeps Conv2d's names) and
    train through ``estimator``; the scale is recomputed from them and is not detached (ReSTE).
    """

    input_sign_zero = 1
    padding_value = 0.0

    def __init__(self, *args, per_channel: bool = False, estimator: BinaryEstimator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"padding_mode={self.padding_mode!r} is not supported; binary convs zero-pad")
        self.per_channel = per_channel
        self.estimator = estimator or BinaryEstimator()

    def _scale(self) -> torch.Tensor:
        """``mean|W|`` shaped to broadcast over the weight: [1,1,1,1] or [O,1,1,1]."""
        dims = (1, 2, 3) if self.per_channel else (0, 1, 2, 3)
        return self.weight.abs().mean(dim=dims, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.estimator(self.weight) * self._scale()
        return self._conv_forward(self.estimator(x), weight, self.bias)

    @torch.no_grad()
    def binary_weight(self) -> torch.Tensor:
        return binary_sign(self.weight).to(torch.int8)

    @torch.no_grad()
    def weight_scale(self) -> torch.Tensor:
        return self._scale().flatten().clone()

    @classmethod
    def from_float(cls, conv: nn.Conv2d, per_channel: bool = False, estimator: BinaryEstimator | None = None):
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            per_channel=per_channel, estimator=estimator, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer.load_state_dict(conv.state_dict())
        return layer

    def extra_repr(self) -> str:
        scale = "per-channel" if self.per_channel else "per-layer"
        return f"{super().extra_repr()}, binary, {scale} scale, {self.estimator}"


class ReLUBatchNorm2d(nn.BatchNorm2d):
    """``BN(ReLU(x))``: the conv -> ReLU -> BN order of ReSTE's networks, as one BatchNorm.

    A binary conv after a plain ReLU would see only non-negative inputs, i.e. all +1. Putting BN
    after the ReLU re-centres the activations, so the next sign carries information; LCE fuses
    exactly this order into the binary conv's output transform. Being a BatchNorm2d subclass,
    it keeps the state-dict names of the BN it replaces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.relu(x))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "ReLUBatchNorm2d":
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=bn.weight.device if bn.affine else None)
        layer.load_state_dict(bn.state_dict())
        return layer


class BiRealBlock(nn.Module):
    """A ResNet basic block with a real-valued shortcut around each binary conv (Bi-Real Net),
    in ReSTE's order: ``h = BN1(ReLU(conv1(x))) + shortcut(x)``, ``out = BN2(ReLU(conv2(h))) + h``.

    No ReLU after the additions: the next block's sign needs signed inputs. It reuses the
    ``conv1/bn1/conv2/bn2/downsample`` modules of the block it replaces, so names (and the
    state dict) are unchanged; the 1x1 ``downsample`` projection stays as it was (float or LSQ).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        hidden = self.bn1(F.relu(self.conv1(x))) + shortcut
        return self.bn2(F.relu(self.conv2(hidden))) + hidden


# -- the plan: which module becomes what ------------------------------------------------------
# Besides LSQ entries ({"bits", "act_bits"}), a binary plan holds entries with a "kind":
#   "binary"  -> BinaryConv2d      {"kind", "bits": 1, "act_bits": 1, "scale", "estimator", "t", "m"}
#   "bireal"  -> BiRealBlock       (a zoo ResNet BasicBlock)
#   "relu_bn" -> ReLUBatchNorm2d   (a BatchNorm2d)
#   "identity"-> nn.Identity       (a ReLU whose work moved into the following ReLUBatchNorm2d)
# ``qtool.quant.prepare.apply_plan`` hands them to ``build_plan_entry``; ``qtool.quant.binarize``
# plans them (the block rewiring per model class: ``qtool.quant.binary_layouts``).

def build_plan_entry(layer: nn.Module, spec: dict) -> nn.Module:
    """The module that replaces ``layer`` for a plan entry with a ``kind`` (idempotent)."""
    kind = spec["kind"]
    if kind == "binary":
        if isinstance(layer, BinaryConv2d):
            return layer
        estimator = BinaryEstimator(spec["estimator"], t=spec["t"], m=spec["m"])
        return BinaryConv2d.from_float(layer, spec["scale"] == "channel", estimator)
    if kind == "bireal":
        return layer if isinstance(layer, BiRealBlock) else BiRealBlock(layer)
    if kind == "relu_bn":
        return layer if isinstance(layer, ReLUBatchNorm2d) else ReLUBatchNorm2d.from_bn(layer)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown plan entry kind {kind!r}")


def binary_layers(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]
