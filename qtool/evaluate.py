"""Top-1 accuracy of a model on domains, with the same split the trainer used.

In a data-parallel run every rank scores its share of each domain and the integer counts are
summed, so all ranks get the same accuracy (and so make the same model-selection decision)."""

from __future__ import annotations

import torch
from torch import nn

from qtool.data import Domain, Split
from qtool.data.batches import iterate_batches
from qtool.train.distributed import World

SINGLE = World()


@torch.no_grad()
def accuracy(model: nn.Module, domain: Domain, batch_size: int = 512, world: World = SINGLE) -> float:
    was_training = model.training
    model.eval()
    part = domain.subset(world.shard(len(domain))) if world.is_distributed else domain
    weight = next(model.parameters())
    correct = 0
    for images, labels in iterate_batches(part, batch_size):
        images = images.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last)
        correct += int((model(images).argmax(1).cpu() == labels).sum())
    model.train(was_training)
    counts = world.sum(torch.tensor([correct, len(part)], dtype=torch.int64, device=world.device))
    return int(counts[0]) / max(1, int(counts[1]))


def source_validation_accuracy(model: nn.Module, split: Split, world: World = SINGLE) -> dict[str, float]:
    return {name: accuracy(model, domain, world=world) for name, domain in split.val.items()}


def split_accuracies(model: nn.Module, split: Split, world: World = SINGLE) -> dict:
    """The report's accuracy keys: each source on its validation part, the target on all of it.

    ``source_val_accuracy`` is the mean over sources (DomainBed's training-domain validation)."""
    per_domain = source_validation_accuracy(model, split, world)
    source_val = sum(per_domain.values()) / len(per_domain)
    target = None
    if split.target is not None:
        target = accuracy(model, split.target, world=world)
        per_domain[split.target.name] = target
    return {"accuracy": per_domain, "target_accuracy": target, "source_val_accuracy": source_val}
