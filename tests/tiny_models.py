"""Small models and data for the exporter tests (not from models/): a synthetic two-domain image
task that a tiny network learns in a second, so verification runs on a trained model with real
decision margins instead of on random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qtool.data import normalize
from qtool.quant.prepare import prepare

CLASSES, SIZE = 4, 28


class DepthwiseResidualNet(nn.Module):
    """Stem, one inverted residual block (1x1 expand, 3x3 depthwise, ReLU6, 1x1 project, skip
    add), a strided conv with bias, global pooling and a Linear head."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                       nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        x = self.down(x)
        return self.head(torch.flatten(self.pool(x), 1))


class BrevitasResidualNet(nn.Module):
    """A Brevitas network that quantizes its residual join (QuantIdentity on the branch,
    QuantReLU after the sum), the way Brevitas asks residual models to be written."""

    def __init__(self):
        super().__init__()
        qnn = pytest.importorskip("brevitas.nn")
        from brevitas.quant import Int8WeightPerChannelFloat

        def conv(cin, cout, stride=1):
            return qnn.QuantConv2d(cin, cout, 3, stride=stride, padding=1, bias=False,
                                   weight_bit_width=4, weight_quant=Int8WeightPerChannelFloat)

        self.input = qnn.QuantIdentity(bit_width=8)
        self.stem, self.bn0, self.relu0 = conv(3, 16), nn.BatchNorm2d(16), qnn.QuantReLU(bit_width=4)
        self.conv1, self.bn1, self.relu1 = conv(16, 16), nn.BatchNorm2d(16), qnn.QuantReLU(bit_width=4)
        self.conv2, self.bn2, self.join = conv(16, 16), nn.BatchNorm2d(16), qnn.QuantIdentity(bit_width=8)
        self.relu2 = qnn.QuantReLU(bit_width=4)
        self.down, self.bn3, self.relu3 = conv(16, 24, 2), nn.BatchNorm2d(24), qnn.QuantReLU(bit_width=4)
        self.pool, self.head_input = nn.AdaptiveAvgPool2d(1), qnn.QuantIdentity(bit_width=8)
        self.head = qnn.QuantLinear(24, 4, bias=True, weight_bit_width=8)

    def forward(self, x):
        x = self.relu0(self.bn0(self.stem(self.input(x))))
        branch = self.join(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        x = self.relu2(x + branch)
        x = self.relu3(self.bn3(self.down(x)))
        return self.head(self.head_input(torch.flatten(self.pool(x), 1)))


def synthetic_domains(count: int = 384, seed: int = 0) -> dict[str, np.ndarray]:
    """Two domains ("a": dark background, "b": brighter and noisier); the class is the quadrant
    holding a bright patch. Keys follow the ``--data`` .npz format."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for domain, (background, noise) in {"a": (40, 20), "b": (80, 35)}.items():
        labels = rng.integers(0, CLASSES, count)
        images = rng.normal(background, noise, size=(count, SIZE, SIZE, 3))
        for index, label in enumerate(labels):
            row, col = divmod(int(label), 2)
            images[index, row * 14 + 3:row * 14 + 11, col * 14 + 3:col * 14 + 11, label % 3] += 150
        arrays[f"{domain}_x"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{domain}_y"] = labels
    return arrays


def as_inputs(images: np.ndarray) -> torch.Tensor:
    return normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float = 3e-3) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def trained_w4a4(arrays: dict[str, np.ndarray], placement: str = "graph") -> nn.Module:
    """Float training, then prepare(4 bits, 4-bit activations, 8-bit first/last) and a short QAT."""
    torch.manual_seed(0)
    images = as_inputs(np.concatenate([arrays["a_x"], arrays["b_x"]]))
    labels = torch.from_numpy(np.concatenate([arrays["a_y"], arrays["b_y"]])).long()
    model = train(DepthwiseResidualNet(), images, labels, steps=40)
    quantized = prepare(model, bits=4, act_bits=4, placement=placement)
    return train(quantized, images, labels, steps=20, lr=1e-3)


def write_factory(folder: Path) -> Path:
    """A FILE.py:FUNCTION source for ``qtool export``: builds the prepared network."""
    path = folder / "tiny_model_source.py"
    path.write_text(
        "from qtool.quant.prepare import prepare\n"
        "from tiny_models import DepthwiseResidualNet\n\n"
        "def build():\n"
        "    return prepare(DepthwiseResidualNet(), bits=4, act_bits=4)\n"
    )
    return path
