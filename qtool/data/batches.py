"""Domain-balanced training batches and digit-friendly augmentation.

Every step takes the same number of images from each source domain (DomainBed's minibatch per
environment). The order comes from one seeded generator, so a run is reproducible and its
position can be saved and restored (``state_dict``). With ``world_size > 1`` each rank takes an
interleaved slice of the same global batch, so a data-parallel run sees exactly the images a
single process with the same global batch would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtool.data import Domain, normalize
from qtool.errors import InputError


class DomainBatchSampler:
    def __init__(self, domains: dict[str, Domain], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < len(domains):
            raise InputError(f"--batch-size {batch_size} is smaller than the number of source domains "
                             f"({len(domains)}): every step takes at least one image from each")
        self.domains = domains
        self.per_domain = batch_size // len(domains)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = {name: torch.randperm(len(d), generator=self.generator) for name, d in domains.items()}
        self.positions = {name: 0 for name in domains}

    @property
    def steps_per_epoch(self) -> int:
        """Steps that show every training image about once."""
        total = sum(len(d) for d in self.domains.values())
        return max(1, math.ceil(total / (self.per_domain * len(self.domains))))

    def _take(self, name: str) -> torch.Tensor:
        picked = []
        needed = self.per_domain
        while needed:
            order, position = self.orders[name], self.positions[name]
            chunk = order[position : position + needed]
            picked.append(chunk)
            needed -= len(chunk)
            self.positions[name] = position + len(chunk)
            if self.positions[name] >= len(order):  # reshuffle at the end of the domain
                self.orders[name] = torch.randperm(len(order), generator=self.generator)
                self.positions[name] = 0
        return torch.cat(picked)

    @property
    def batch_size(self) -> int:
        """Images in one global batch (all ranks together)."""
        return self.per_domain * len(self.domains)

    @property
    def local_rows(self) -> torch.Tensor:
        """Positions of this rank's images inside the global batch (domain blocks, interleaved)."""
        rows = torch.arange(self.batch_size).view(len(self.domains), self.per_domain)
        return rows[:, self.rank :: self.world_size].reshape(-1)

    def next_indices(self) -> dict[str, torch.Tensor]:
        """The next global batch as image indices per domain (advances the position)."""
        return {name: self._take(name) for name in self.domains}

    def gather(self, indices: dict[str, torch.Tensor], whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of this rank's part of a global batch (``whole``: all of it)."""
        images, labels = [], []
        for name, domain in self.domains.items():
            index = indices[name] if whole else indices[name][self.rank :: self.world_size]
            images.append(domain.images[index])
            labels.append(domain.labels[index])
        return torch.cat(images), torch.cat(labels)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of this rank's part of the next global batch."""
        return self.gather(self.next_indices())

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "orders": dict(self.orders),
            "positions": dict(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.orders = dict(state["orders"])
        self.positions = dict(state["positions"])


class DigitAugment:
    """Small random affine transforms (rotation, scale, shift) applied to a whole batch at once.

    No flips: they change a digit's meaning. The transform is drawn from its own seeded
    generator so augmentation is reproducible and independent of the batch order.
    """

    def __init__(self, seed: int, degrees: float = 10.0, scale: float = 0.1, shift: float = 0.1):
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.degrees, self.scale, self.shift = degrees, scale, shift

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(len(images)))

    def draw(self, n: int) -> torch.Tensor:
        """``n`` random affine transforms (n x 2 x 3). Data-parallel ranks draw them for the whole
        global batch and each applies its rows, so augmentation does not depend on the rank count."""
        uniform = lambda: torch.rand(n, generator=self.generator) * 2 - 1  # noqa: E731
        angle = uniform() * math.radians(self.degrees)
        zoom = 1 + uniform() * self.scale
        tx, ty = uniform() * self.shift * 2, uniform() * self.shift * 2  # grid units span [-1, 1]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def apply(self, images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        # Border padding repeats the edge pixels: right for black MNIST and coloured MNIST-M backgrounds alike.
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def iterate_batches(domain: Domain, batch_size: int = 512):
    """Normalised evaluation batches of one domain, in order."""
    for start in range(0, len(domain), batch_size):
        yield normalize(domain.images[start : start + batch_size]), domain.labels[start : start + batch_size]
