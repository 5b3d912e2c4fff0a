"""Training checkpoints: everything a run needs to continue bit-for-bit after a crash.

A training checkpoint is an ordinary qtool model checkpoint (``qtool eval`` reads it: the model
as it was at that step) plus a ``training`` entry: the step, optimizer (with the base Adam
moments), LR schedule, sampler position, augmentation and RNG states, callbacks' states (GAQAT,
ReSTE) and model selection (best weights, score, history). Everything is tensors and plain
values, so it loads with ``weights_only=True`` like any other qtool checkpoint, and it is
written atomically, so a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qtool.checkpoint import read_checkpoint, save_checkpoint
from qtool.errors import QtoolError


@dataclass
class Checkpointing:
    """Where and how often a ``Trainer`` saves its state (only rank 0 writes).

    A checkpoint is written at the end of every epoch, after the last step, and every ``every``
    steps when ``every`` > 0. ``header`` (arch, num_classes, in_channels, image_size) makes the
    file a loadable model checkpoint; ``meta`` records the run's identity for ``--resume``."""

    path: Path
    header: dict
    every: int = 0
    meta: dict = field(default_factory=dict)


def rng_state() -> dict:
    """Every global random generator a training step might touch."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))


def write_training_checkpoint(checkpointing: Checkpointing, model: nn.Module, training: dict) -> None:
    h = checkpointing.header
    save_checkpoint(checkpointing.path, model, h["arch"], h["num_classes"], h["in_channels"], h["image_size"],
                    checkpointing.meta, training=training)


def read_training_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's payload (``weights_only`` load), or a one-line ``QtoolError``."""
    payload = read_checkpoint(path)
    if not isinstance(payload.get("training"), dict):
        raise QtoolError(f"{path} is a model checkpoint without training state; it cannot be resumed")
    return payload
