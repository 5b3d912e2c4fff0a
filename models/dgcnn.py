"""DomainBed's digit CNN (``MNIST_CNN``): four 3x3 convs (64-128-128-128), GroupNorm, average
pool, linear head. As in DomainBed, GroupNorm follows the ReLU, so the next conv sees signed
inputs: its activation quantizer picks the signed grid on the first batch."""

from __future__ import annotations

from torch import nn


class DGCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths, strides = [64, 128, 128, 128], [1, 2, 1, 1]
        layers, channels = [], in_channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride, 1), nn.ReLU(inplace=True), nn.GroupNorm(8, width)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def dg_cnn(num_classes: int = 10, in_channels: int = 3) -> DGCNN:
    return DGCNN(num_classes, in_channels)
