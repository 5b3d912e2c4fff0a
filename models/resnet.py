"""CIFAR-style ResNets for small images: a 3x3 stem with stride 1 and no max-pool, so that
32x32 (or 28x28) inputs keep enough spatial resolution for three or four stages."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            # A 1x1 projection: it has weights, so it can be quantized (or kept in float for BNNs).
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], widths: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for index, (count, planes) in enumerate(zip(blocks, widths)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """He et al.'s CIFAR ResNet-20: three stages of 3 blocks, 16/32/64 channels, 0.27 M weights."""
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 (2-2-2-2 blocks, 64-512 channels) with the CIFAR stem, 11 M weights."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)
