"""VGG-small, the 6-conv CIFAR network used by the binary-network literature (LQ-Nets, ReSTE)."""

from __future__ import annotations

from torch import nn

CHANNELS = [128, 128, "M", 256, 256, "M", 512, 512, "M"]


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for item in CHANNELS:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            channels = item
        self.features = nn.Sequential(*layers)
        # 32x32 inputs reach 4x4 here; pooling to 4x4 keeps the classic 8192-wide head for any size.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(channels * 16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def vgg_small(num_classes: int = 10, in_channels: int = 3) -> VGGSmall:
    return VGGSmall(num_classes, in_channels)
