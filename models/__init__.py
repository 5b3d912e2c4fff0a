"""The model zoo: plain ``nn.Module`` classes with no quantization code inside.

Every model takes ``num_classes`` and ``in_channels`` and accepts any input of at least 28x28.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .dgcnn import dg_cnn
from .mobilenet import mobilenetv2
from .resnet import resnet18, resnet20
from .vgg import vgg_small

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "vgg-small": vgg_small,
    "dg-cnn": dg_cnn,
    "mobilenetv2": mobilenetv2,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if name not in ZOO:
        raise KeyError(name)
    return ZOO[name](num_classes=num_classes, in_channels=in_channels)
