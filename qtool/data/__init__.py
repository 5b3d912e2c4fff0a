"""Multi-domain image data behind one function, and the leave-one-domain-out protocol.

``load_domains`` returns every domain as uint8 tensors in memory (N x C x H x W); images are
normalised per batch, so data stays 4x smaller than float and is decoded only once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qtool.data.sources import ROTATED_DIGITS, read_raw
from qtool.errors import QtoolError

__all__ = ["Domain", "DomainSet", "Split", "load_domains", "split_domains", "normalize", "ROTATED_DIGITS"]

# Pixels map to [-1, 1]: a fixed transform that needs no statistics and that the exporter
# documents as the model's input contract.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


@dataclass
class Domain:
    name: str
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Domain":
        return Domain(self.name, self.images[index], self.labels[index])


@dataclass
class DomainSet:
    spec: str
    domains: dict[str, Domain]
    num_classes: int
    channels: int
    image_size: int

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def check_domain(self, name: str | None) -> None:
        if name is not None and name not in self.domains:
            raise QtoolError(f"unknown domain {name!r}; {self.spec} has: {', '.join(self.names)}")


def load_domains(spec: str, image_size: int | None = None) -> DomainSet:
    """Read ``--data`` (``rotated-digits``, ``PATH.npz`` or ``DIR``) into a ``DomainSet``.

    Images are resized to ``image_size`` when given (default: the size in the data; 28 for
    rotated-digits, 64 for image folders); grey domains are repeated to RGB when others are RGB.
    """
    raw = read_raw(spec, image_size)
    channels = max(images.shape[-1] for images, _ in raw.values())
    size = image_size or max(max(images.shape[1:3]) for images, _ in raw.values())
    if size < 28:
        raise QtoolError(f"images must be at least 28x28 for the model zoo, got {size}; pass --image-size 28 or more")
    domains = {}
    for name, (images, labels) in raw.items():
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if tensor.shape[1] != channels:
            tensor = tensor.expand(-1, channels, -1, -1)
        if tuple(tensor.shape[2:]) != (size, size):
            resized = F.interpolate(tensor.float(), size=(size, size), mode="bilinear", align_corners=False)
            tensor = resized.round().clamp(0, 255).to(torch.uint8)
        domains[name] = Domain(name, tensor.contiguous(), torch.from_numpy(labels))
    num_classes = int(max(int(d.labels.max()) for d in domains.values())) + 1
    return DomainSet(spec, domains, num_classes, channels, size)


@dataclass
class Split:
    """Leave-one-domain-out: train and validation parts of every source, and the held-out target."""

    train: dict[str, Domain]
    val: dict[str, Domain]
    target: Domain | None

    @property
    def source_names(self) -> list[str]:
        return list(self.train)


def split_domains(data: DomainSet, target: str | None, holdout: float = 0.2, seed: int = 0) -> Split:
    """DomainBed protocol: each source domain is split (1 - holdout) / holdout by ``seed``; the
    validation parts of the sources select the model; the target is never seen in training."""
    data.check_domain(target)
    if not 0.0 < holdout < 1.0:
        raise QtoolError(f"holdout fraction must be in (0, 1), got {holdout}")
    sources = [name for name in data.names if name != target]
    if not sources:
        raise QtoolError(f"no source domain left after holding out {target!r}")
    generator = torch.Generator().manual_seed(seed)
    train, val = {}, {}
    for name in sources:
        domain = data.domains[name]
        order = torch.randperm(len(domain), generator=generator)
        cut = max(1, int(round(len(domain) * holdout)))
        if cut >= len(domain):
            raise QtoolError(f"domain {name!r} has too few images ({len(domain)}) to split off a validation part")
        val[name], train[name] = domain.subset(order[:cut]), domain.subset(order[cut:])
    return Split(train, val, data.domains[target] if target is not None else None)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (the model's input contract)."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
