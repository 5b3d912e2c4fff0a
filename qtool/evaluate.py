"""Top-1 accuracy of a model on domains, with the same split the trainer used."""

from __future__ import annotations

import torch
from torch import nn

from qtool.data import Domain, Split
from qtool.data.batches import iterate_batches


@torch.no_grad()
def accuracy(model: nn.Module, domain: Domain, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for images, labels in iterate_batches(domain, batch_size):
        correct += int((model(images.contiguous(memory_format=torch.channels_last)).argmax(1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(domain))


def source_validation_accuracy(model: nn.Module, split: Split) -> dict[str, float]:
    return {name: accuracy(model, domain) for name, domain in split.val.items()}


def split_accuracies(model: nn.Module, split: Split) -> dict:
    """The report's accuracy keys: each source on its validation part, the target on all of it.

    ``source_val_accuracy`` is the mean over sources (DomainBed's training-domain validation)."""
    per_domain = source_validation_accuracy(model, split)
    source_val = sum(per_domain.values()) / len(per_domain)
    target = None
    if split.target is not None:
        target = accuracy(model, split.target)
        per_domain[split.target.name] = target
    return {"accuracy": per_domain, "target_accuracy": target, "source_val_accuracy": source_val}
