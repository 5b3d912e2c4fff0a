"""Per model class, the block rewiring that makes a network binarizable (``--bits 1``).

A binary conv after a plain ReLU sees only non-negative inputs, all +1 after the sign, so each
family needs its own small rewiring to ReSTE's conv -> ReLU -> BN order (and, for ResNets, Bi-Real
shortcuts). A *layout* is a function ``model -> Plan`` returning only those rewiring entries
(kinds ``"identity"``, ``"relu_bn"``, ``"bireal"``, built by ``qtool.quant.binary.build_plan_entry``);
``qtool.quant.binarize`` adds the binary convs. Layouts are looked up along the model's class
hierarchy, like torchao's handler registry: ``register_binary_layout(MyNet)`` on a function
teaches ``prepare_binary`` a new family, with no change here. The zoo's are registered below.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from qtool.errors import QtoolError
from qtool.models.dgcnn import DGCNN
from qtool.models.resnet import BasicBlock, ResNet
from qtool.models.vgg import VGGSmall
from qtool.quant.prepare import Plan

Layout = Callable[[nn.Module], Plan]
LAYOUTS: dict[type, Layout] = {}
BINARY_ZOO: list[str] = []  # the zoo names whose class has a layout


def register_binary_layout(cls: type, *zoo_names: str) -> Callable[[Layout], Layout]:
    """Decorator: ``layout`` rewires instances of ``cls`` (and its subclasses) for ``--bits 1``;
    ``zoo_names`` are the ``qtool.models.ZOO`` names built from ``cls``, checked before training."""

    def decorator(layout: Layout) -> Layout:
        LAYOUTS[cls] = layout
        BINARY_ZOO.extend(name for name in zoo_names if name not in BINARY_ZOO)
        return layout

    return decorator


def binary_layout(model: nn.Module) -> Plan:
    """The rewiring entries for ``model``'s class, or a ``QtoolError`` naming what is supported."""
    for cls in type(model).__mro__:
        if cls in LAYOUTS:
            return LAYOUTS[cls](model)
    raise QtoolError(f"--bits 1 supports {', '.join(BINARY_ZOO)}, not {type(model).__name__} "
                     "(qtool.quant.binary_layouts.register_binary_layout adds a model class)")


@register_binary_layout(ResNet, "resnet20", "resnet18")
def _resnet(model: ResNet) -> Plan:
    plan: Plan = {"relu": {"kind": "identity"}, "bn1": {"kind": "relu_bn"}}  # stem: conv -> ReLU -> BN
    plan.update({name: {"kind": "bireal"} for name, module in model.named_modules() if isinstance(module, BasicBlock)})
    return plan


@register_binary_layout(VGGSmall, "vgg-small")
def _vgg_small(model: VGGSmall) -> Plan:
    plan: Plan = {}
    modules = list(model.features.named_children())
    for (bn_name, bn), (relu_name, relu) in zip(modules, modules[1:]):
        if isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU):
            plan[f"features.{relu_name}"] = {"kind": "identity"}
            plan[f"features.{bn_name}"] = {"kind": "relu_bn"}
    return plan


@register_binary_layout(DGCNN, "dg-cnn")
def _dg_cnn(model: DGCNN) -> Plan:
    return {}  # conv -> ReLU -> GroupNorm already: every conv but the first sees signed inputs
