"""Binary neural networks: sign binarizers with STE/ReSTE gradients, the binary conv layer, and
``prepare_binary`` that turns a zoo model into a 1-bit network.

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

import copy
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import QtoolError
from qtool.extensions import load_extension
from qtool.quant.prepare import Plan, apply_plan, quantizable_layers

ESTIMATORS = ("ste", "reste")
SOURCES = ("cpu/sign_estimator.cpp",)  # the fused estimator op, under kernels/
STE_CLIP = 1.0
_EXTENSION = "qtool_sign_estimator"


def binary_sign(z: torch.Tensor) -> torch.Tensor:
    """+1 where ``z >= 0`` (zero included), -1 elsewhere; same dtype and layout as ``z``."""
    return torch.ones_like(z).masked_fill_(z < 0, -1.0)


def power_function(z: torch.Tensor, o: float) -> torch.Tensor:
    """ReSTE's equivalent forward ``sign(z) |z|^(1/o)`` (identity at ``o = 1``)."""
    return binary_sign(z) * z.abs().pow(1.0 / o)


def reste_gradient(z: torch.Tensor, o: float, t: float, m: float) -> torch.Tensor:
    """d sign(z)/dz as ReSTE estimates it, element-wise (see the module docstring); the
    reference for the fused kernel. ``o = 1, t = 1`` is the STE."""
    magnitude = z.abs()
    gradient = magnitude.clamp_min(m).pow_((1.0 - o) / o).div_(o)
    gradient.masked_fill_(magnitude < m, m ** ((1.0 - o) / o))
    return gradient.masked_fill_(magnitude > t, 0.0)


def _fused():
    # -ffast-math lets GCC call glibc's vector exp/log (libmvec) in ReSTE's power: a 15x faster
    # backward than scalar calls. Elsewhere the kernel still builds, with scalar math.
    libmvec = sys.platform.startswith("linux") and platform.machine() == "x86_64"
    return load_extension(_EXTENSION, list(SOURCES), extra_cflags=["-O3", "-fopenmp-simd", "-ffast-math"],
                          extra_ldflags=["-lmvec"] if libmvec else [])


def _can_fuse(z: torch.Tensor) -> bool:
    if z.device.type != "cpu" or z.dtype != torch.float32:
        return False
    dense = z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last)
    return dense and _fused() is not None


class _BinarySign(torch.autograd.Function):
    """``binary_sign`` forward, ``reste_gradient`` backward; the fused C++ kernel when it loads.
    Autograd alone would sweep the activation five or six times per step in the backward."""

    @staticmethod
    def forward(ctx, z, o: float, t: float, m: float):
        ctx.save_for_backward(z)
        ctx.params = (o, t, m)
        ctx.fused = _can_fuse(z)
        return _fused().sign_forward(z) if ctx.fused else binary_sign(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        if ctx.fused and grad.dtype == torch.float32:
            return _fused().sign_backward(grad, z, *ctx.params), None, None, None
        return grad * reste_gradient(z, *ctx.params), None, None, None


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
            return _BinarySign.apply(z, 1.0, STE_CLIP, self.m)
        return _BinarySign.apply(z, float(self.o), float(self.t), float(self.m))


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
# ``qtool.quant.prepare.apply_plan`` hands them to ``build_plan_entry``.

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


@dataclass(frozen=True)
class BinaryOptions:
    """What ``-O KEY=VALUE`` can set for ``--bits 1`` (see ``binary_options``)."""

    estimator: str = "reste"
    o_end: float = 3.0
    t: float = 1.5
    m: float = 0.1
    scale: str = "layer"
    keep_bits: int = 32


def binary_options(estimator: str = "reste", o_end: float | None = None, t: float | None = None,
                   m: float | None = None, scale: str = "layer", keep_bits: int = 32, **unknown) -> BinaryOptions:
    """Check a user's binary options, fill in defaults; a mistake is one ``QtoolError`` line.

    ``o_end``, ``t``, ``m``: ReSTE's schedule end (3), clip (1.5) and secant width (0.1), which
    the STE does not take; ``scale``: ``layer`` (ReSTE) or ``channel``; ``keep_bits``: 32 keeps
    the first conv, the classifier and the 1x1 projections in float, 2-8 quantizes them with LSQ.
    """
    if unknown:
        raise QtoolError(f"unknown binary option(s) {', '.join(sorted(unknown))}; "
                         "known: o_end, t, m (ReSTE), scale (layer|channel), keep_bits (32|8|4|3|2)")
    reste = {"o_end": o_end, "t": t, "m": m}
    if estimator == "ste" and any(value is not None for value in reste.values()):
        raise QtoolError("o_end, t and m tune ReSTE; --method ste clips at |z| <= 1 and takes none of them")
    defaults = BinaryOptions()
    reste = {key: float(getattr(defaults, key) if value is None else value) for key, value in reste.items()}
    if reste["o_end"] < 1:
        raise QtoolError(f"ReSTE's o_end must be at least 1, got {reste['o_end']}")
    BinaryEstimator(estimator, t=reste["t"], m=reste["m"])  # checks the estimator, t and m
    if scale not in ("layer", "channel"):
        raise QtoolError(f"binary scale must be 'layer' or 'channel', got {scale!r}")
    if keep_bits not in (2, 3, 4, 8, 32):
        raise QtoolError(f"keep_bits must be 32 (float) or 2, 3, 4, 8 (LSQ), got {keep_bits}")
    return BinaryOptions(estimator, scale=scale, keep_bits=keep_bits, **reste)


# Zoo families whose layout ``_structure_plan`` knows how to make binarizable.
BINARY_ZOO = ("resnet20", "resnet18", "vgg-small", "dg-cnn")


def _structure_plan(model: nn.Module) -> tuple[Plan, list[str]]:
    """The block rewiring that makes ``model`` binarizable, and the convs that stay non-binary
    (the first conv and the 1x1 projections)."""
    from qtool.models.dgcnn import DGCNN
    from qtool.models.resnet import BasicBlock, ResNet
    from qtool.models.vgg import VGGSmall

    plan: Plan = {}
    if isinstance(model, ResNet):
        plan["relu"] = {"kind": "identity"}  # stem: conv -> ReLU -> BN, as in ReSTE
        plan["bn1"] = {"kind": "relu_bn"}
        for name, module in model.named_modules():
            if isinstance(module, BasicBlock):
                plan[name] = {"kind": "bireal"}
    elif isinstance(model, VGGSmall):
        modules = list(model.features.named_children())
        for (bn_name, bn), (relu_name, relu) in zip(modules, modules[1:]):
            if isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU):
                plan[f"features.{relu_name}"] = {"kind": "identity"}
                plan[f"features.{bn_name}"] = {"kind": "relu_bn"}
    elif not isinstance(model, DGCNN):  # DG-CNN is conv -> ReLU -> GroupNorm already
        raise QtoolError(f"--bits 1 supports {', '.join(BINARY_ZOO)}, not {type(model).__name__}")
    convs = [(name, m) for name, m in quantizable_layers(model) if isinstance(m, nn.Conv2d)]
    kept = [convs[0][0]] + [name for name, m in convs[1:] if m.kernel_size == (1, 1)]
    return plan, kept


def binary_plan(model: nn.Module, options: BinaryOptions) -> Plan:
    """Binarize every conv except the first and the 1x1 projections; keep those and the
    classifier in float or LSQ (``keep_bits``); add the block rewiring."""
    plan, kept = _structure_plan(model)
    for name, layer in quantizable_layers(model):
        if isinstance(layer, nn.Conv2d) and name not in kept:
            plan[name] = {"kind": "binary", "bits": 1, "act_bits": 1, "scale": options.scale,
                          "estimator": options.estimator, "t": options.t, "m": options.m}
        elif options.keep_bits != 32:
            plan[name] = {"bits": options.keep_bits, "act_bits": options.keep_bits}
    return plan


def check_binary_request(model: str, method_options: dict, user_options: dict) -> None:
    """Fail fast (before data loading and pre-training) on a zoo model or an option that
    ``--bits 1`` cannot take. ``model`` is a zoo name or a checkpoint path (checked later);
    ``method_options`` are the method's own (its estimator), ``user_options`` the ``-O`` ones."""
    from qtool.models import ZOO

    if model in ZOO and model not in BINARY_ZOO:
        raise QtoolError(f"--bits 1 supports {', '.join(BINARY_ZOO)}, not {model}")
    chosen = method_options.get("estimator")
    if "estimator" in user_options and user_options["estimator"] != chosen:
        raise QtoolError(f"the method sets the estimator ({chosen}); choose another with --method, not -O estimator")
    binary_options(**{**method_options, **user_options})


def prepare_binary(model: nn.Module, inplace: bool = False, **options) -> nn.Module:
    """Return ``model`` as a binary network (``qtool quantize --bits 1``); ``options`` are
    ``binary_options``'. The plan is stored as ``model.qtool_plan`` for checkpoints."""
    plan = binary_plan(model, binary_options(**options))
    if not inplace:
        model = copy.deepcopy(model)
    apply_plan(model, plan)
    model.qtool_plan = plan  # read by the checkpoint writer
    return model


def binary_layers(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]
