"""The training loop: domain-balanced batches, a (two-pass) optimizer step, periodic model
selection on the source validation split, callbacks for method-specific work (GAQAT, ReSTE).

One loop serves full-precision pre-training and QAT fine-tuning; which optimizer family and
which callbacks run is decided by the method (``qtool.train.methods``).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qtool.data import Split, normalize
from qtool.data.batches import DigitAugment, DomainBatchSampler
from qtool.evaluate import source_validation_accuracy
from qtool.train.optim import build_optimizer


@dataclass
class TrainConfig:
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "sagm"  # plain | sam | gsam | sagm
    rho: float = 0.05
    alpha: float | None = None
    seed: int = 0
    augment: bool = True
    evals: int = 10  # model-selection checkpoints over the run
    warmup_steps: int = 0
    steps: int | None = None  # overrides epochs when given


class Callback(Protocol):
    """Method-specific work that hooks into the loop. Every method is optional:
    ``report()`` adds keys to report.json, ``write_artifacts(out_dir)`` writes files (plots)
    next to it, ``state_dict()``/``load_state_dict()`` carry the callback's state in checkpoints."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_step_end(self, trainer: "Trainer", step: int, loss: float) -> None: ...
    def report(self) -> dict: ...


@dataclass
class TrainResult:
    best_val: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """The perturbed pass of SAM-family methods must not move BN running statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        split: Split,
        config: TrainConfig,
        callbacks: list | None = None,
        progress: Callable[[dict], None] | None = None,
    ):
        self.model = model.to(memory_format=torch.channels_last)
        self.split = split
        self.config = config
        self.callbacks = callbacks or []
        self.progress = progress
        self.sampler = DomainBatchSampler(split.train, config.batch_size, config.seed)
        self.augment = DigitAugment(config.seed) if config.augment else None
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = config.steps or max(1, int(round(config.epochs * self.steps_per_epoch)))
        # The optimizer is built here, after quantizers were inserted, so step sizes train too.
        params = [p for p in model.parameters() if p.requires_grad]
        base = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = build_optimizer(config.optimizer, base, config.rho, config.alpha)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(base, self._lr_factor)
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero."""
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def _eval_steps(self) -> set[int]:
        count = max(1, min(self.config.evals, self.total_steps))
        return {round(self.total_steps * (i + 1) / count) for i in range(count)}

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.sampler.next_batch()
        images = normalize(images)
        if self.augment is not None:
            images = self.augment(images)
        return images.contiguous(memory_format=torch.channels_last), labels

    def fit(self) -> TrainResult:
        start = time.perf_counter()
        eval_steps = self._eval_steps()
        best_val, best_step, best_state = -1.0, 0, None
        history: list[dict] = []
        self.model.train()
        self._call("on_train_start")
        while self.step < self.total_steps:
            if self.step % self.steps_per_epoch == 0:
                self._call("on_epoch_start", self.epoch)
            images, labels = self._batch()

            def loss_fn(perturbed: bool):
                if not perturbed:
                    logits = self.model(images)
                    return F.cross_entropy(logits, labels), logits
                with frozen_batchnorm_statistics(self.model):
                    logits = self.model(images)
                    return F.cross_entropy(logits, labels), logits

            loss, logits = self.optimizer.step(loss_fn)
            self.schedule.step()
            self.step += 1
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at step {self.step}: loss is {loss_value}")
            self._call("on_step_end", self.step, loss_value)
            record = {"step": self.step, "loss": loss_value, "acc": float((logits.argmax(1) == labels).float().mean())}
            if self.step in eval_steps:
                per_domain = source_validation_accuracy(self.model, self.split)
                record["val"] = sum(per_domain.values()) / len(per_domain)
                history.append(record)
                if record["val"] > best_val:  # training-domain validation selects the checkpoint
                    best_val, best_step = record["val"], self.step
                    best_state = copy.deepcopy(self.model.state_dict())
            if self.progress is not None:
                self.progress(record)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return TrainResult(best_val, best_step, self.step, time.perf_counter() - start, history)

    def callback_reports(self) -> dict:
        merged: dict = {}
        for callback in self.callbacks:
            report = getattr(callback, "report", None)
            if report is not None:
                merged.update(report())
        return merged
