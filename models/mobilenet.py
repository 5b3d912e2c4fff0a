"""MobileNetV2 for small images: stride-1 stem and half width (0.5x channels), so it runs on
32x32 inputs at a few tens of MFLOPs while keeping depthwise convs and inverted residuals."""

from __future__ import annotations

from torch import nn

# (expansion, output channels at width 1.0, repeats, first stride); CIFAR variant of Sandler et al.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _width(channels: float, divisor: int = 8) -> int:
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = [] if expansion == 1 else [conv_bn_relu(in_ch, hidden, 1)]
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 0.5):
        super().__init__()
        channels = _width(32 * width)
        layers = [conv_bn_relu(in_channels, channels, 3)]
        for expansion, out, repeats, stride in SETTINGS:
            out = _width(out * width)
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out, stride if index == 0 else 1, expansion))
                channels = out
        last = _width(1280 * width)
        layers.append(conv_bn_relu(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels)
