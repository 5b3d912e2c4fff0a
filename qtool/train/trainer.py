"""The training loop: domain-balanced batches, a (two-pass) optimizer step, periodic model
selection on the source validation split, callbacks for method-specific work (GAQAT, ReSTE).

One loop serves full-precision pre-training and QAT fine-tuning; which optimizer family and
which callbacks run is decided by the method (``qtool.train.methods``). The same loop runs
data-parallel under torchrun (``qtool.train.distributed``), writes resumable checkpoints
(``qtool.train.resume``) and stops on divergence (``qtool.train.guard``).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qtool.data import Split, normalize
from qtool.data.batches import DigitAugment, DomainBatchSampler
from qtool.errors import QtoolError
from qtool.evaluate import source_validation_accuracy
from qtool.options import default
from qtool.train.distributed import World, replicas_agree
from qtool.train.guard import check_step
from qtool.train.optim import build_optimizer
from qtool.train.resume import Checkpointing, rng_state, set_rng_state, write_training_checkpoint
from qtool.train.sync_batchnorm import global_batch_statistics


@dataclass
class TrainConfig:
    """One training phase. Its defaults are ``qtool quantize``'s QAT defaults (``qtool.options``),
    so ``TrainConfig()`` trains as the command line does unless told otherwise."""

    epochs: float = default("epochs")
    batch_size: int = default("batch_size")
    lr: float = default("lr")
    weight_decay: float = default("weight_decay")
    optimizer: str = "sagm"  # a name in qtool.train.optim.OPTIMIZERS: that of the default --method
    rho: float = default("rho")
    alpha: float | None = default("alpha")  # None: the optimizer's own default
    seed: int = default("seed")
    augment: bool = default("augment")
    evals: int = default("evals")  # model-selection checkpoints over the run
    warmup_steps: int = 0
    steps: int | None = default("steps")  # overrides epochs when given


class Callback(Protocol):
    """Method-specific work that hooks into the loop. Every method is optional:
    ``report()`` adds keys to report.json, ``write_artifacts(out_dir)`` writes files (plots)
    next to it, ``state_dict()``/``load_state_dict()`` carry the callback's state in checkpoints
    (a resumed run calls ``on_train_start`` first, then ``load_state_dict``)."""

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
    images_per_second: float = 0.0  # training steps only (no evaluation, no checkpoint writes)


@dataclass
class Selection:
    """Model selection on the source validation split: the best weights seen so far."""

    best_val: float = -1.0
    best_step: int = 0
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """The perturbed pass of SAM-family methods (and the initialisation pass) must not move
    BN running statistics, nor count a batch."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    counts = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in zip(norms, momenta, counts):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        split: Split,
        config: TrainConfig,
        callbacks: list | None = None,
        progress: Callable[[dict], None] | None = None,
        world: World | None = None,
        checkpointing: Checkpointing | None = None,
    ):
        self.world = world or World()
        self.model = model.to(self.world.device, memory_format=torch.channels_last)
        self.split = split
        self.config = config
        self.callbacks = callbacks or []
        self.progress = progress
        self.checkpointing = checkpointing
        self.sampler = DomainBatchSampler(split.train, config.batch_size, config.seed, self.world.rank, self.world.size)
        if self.sampler.per_domain % self.world.size:
            raise QtoolError(f"--batch-size {config.batch_size} gives {self.sampler.per_domain} images per source domain, "
                             f"which does not split evenly over {self.world.size} processes")
        self.augment = DigitAugment(config.seed) if config.augment else None
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = config.steps or max(1, int(round(config.epochs * self.steps_per_epoch)))
        # The optimizer is built here, after quantizers were inserted, so step sizes train too.
        params = [p for p in model.parameters() if p.requires_grad]
        base = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = build_optimizer(config.optimizer, base, rho=config.rho, alpha=config.alpha)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(base, self._lr_factor)
        self.step = 0
        self.selection = Selection()
        self.saved_step: int | None = None  # step of the last checkpoint written

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

    @property
    def budget(self) -> dict:
        """The training budget, as the report states it next to the convergence curve."""
        return {"epochs": round(self.total_steps / self.steps_per_epoch, 3), "steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "batch_size": self.sampler.batch_size,
                "evals": len(self._eval_steps())}

    def _eval_steps(self) -> set[int]:
        count = max(1, min(self.config.evals, self.total_steps))
        return {round(self.total_steps * (i + 1) / count) for i in range(count)}

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    # -- batches --------------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype  # a float64 model trains on float64 images
        images = normalize(images.to(self.world.device)).to(dtype)
        if theta is not None:
            images = self.augment.apply(images, theta.to(dtype))
        return images.contiguous(memory_format=torch.channels_last)

    def _draw(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The next global batch (image indices per domain) and its augmentation transforms."""
        indices = self.sampler.next_indices()
        theta = self.augment.draw(self.sampler.batch_size) if self.augment is not None else None
        return indices, theta

    def _local_batch(self, indices: dict[str, torch.Tensor], theta: torch.Tensor | None):
        """This rank's images and labels of a global batch."""
        images, labels = self.sampler.gather(indices)
        local_theta = theta[self.sampler.local_rows] if theta is not None else None
        return self._prepare(images, local_theta), labels.to(self.world.device)

    @torch.no_grad()
    def _initialize_lazy_state(self, indices: dict[str, torch.Tensor], theta: torch.Tensor | None) -> None:
        """Pass the whole first global batch through the model once, with BN statistics frozen,
        before BatchNorm is synchronised and DDP wraps the model: quantizers that initialise on
        their first input (LSQ step sizes, activation signs) then decide on the same global
        batch, with the same operations, as a single process; every rank gets the same values."""
        images, _ = self.sampler.gather(indices, whole=True)
        with frozen_batchnorm_statistics(self.model):
            self.model(self._prepare(images, theta))

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: dict | None = None) -> TrainResult:
        """Train to ``total_steps``; ``resume`` (a ``state_dict()``) continues an interrupted run."""
        start = time.perf_counter()
        eval_steps = self._eval_steps()
        self.model.train()
        self._call("on_train_start")
        if resume is not None:
            self.load_state_dict(resume)
        first_step, train_seconds = self.step, 0.0
        first_batch = self._draw() if self.step == 0 else None
        if first_batch is not None:
            self._initialize_lazy_state(*first_batch)
        with global_batch_statistics(self.model, self.world):
            network = None
            while self.step < self.total_steps:
                step_start = time.perf_counter()
                if self.step % self.steps_per_epoch == 0:
                    self._call("on_epoch_start", self.epoch)
                images, labels = self._local_batch(*(first_batch or self._draw()))
                first_batch = None
                if network is None:
                    network = self.world.wrap(self.model)
                loss_value, accuracy = self._train_step(network, images, labels)
                train_seconds += time.perf_counter() - step_start
                check_step(self.step, loss_value, self.model, self._last_good())
                self._call("on_step_end", self.step, loss_value)
                record = {"step": self.step, "loss": loss_value, "acc": accuracy}
                if self.step in eval_steps:
                    self._select(record)
                if self._checkpoint_due():
                    self.save_checkpoint()
                if self.progress is not None:
                    self.progress(record)
            del network  # drops DDP's gradient hooks before the model trains again (QAT after pre-training)
        if self.selection.best_state is not None:
            self.model.load_state_dict(self.selection.best_state)
        images = (self.step - first_step) * self.sampler.batch_size
        return TrainResult(self.selection.best_val, self.selection.best_step, self.step, time.perf_counter() - start,
                           self.selection.history, images / train_seconds if train_seconds else 0.0)

    def _train_step(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """One optimizer step (two forward/backward passes for SAM-family methods, each
        all-reduced by DDP); returns the global batch's loss and accuracy."""

        def loss_fn(perturbed: bool):
            if not perturbed:
                logits = network(images)
                return F.cross_entropy(logits, labels), logits
            with frozen_batchnorm_statistics(self.model):
                logits = network(images)
                return F.cross_entropy(logits, labels), logits

        loss, logits = self.optimizer.step(loss_fn)
        self.schedule.step()
        self.step += 1
        return self._global_loss_and_accuracy(loss, logits, labels)

    def _global_loss_and_accuracy(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Mean loss and accuracy over the global batch (every rank gets the same numbers)."""
        count = len(labels)
        totals = torch.stack([loss.double() * count, (logits.argmax(1) == labels).sum().double(),
                              torch.tensor(float(count), dtype=torch.float64, device=loss.device)])
        totals = self.world.sum(totals)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    def _select(self, record: dict) -> None:
        """Training-domain validation selects the checkpoint (same numbers on every rank)."""
        if not replicas_agree(self.model, self.world):
            raise RuntimeError(f"data-parallel replicas diverged by step {self.step}: ranks hold different weights")
        per_domain = source_validation_accuracy(self.model, self.split, self.world)
        record["val"] = sum(per_domain.values()) / len(per_domain)
        record["val_per_domain"] = per_domain  # the convergence curve per domain (qtool.train.convergence)
        record["epoch"] = round(self.step / self.steps_per_epoch, 3)
        self.selection.history.append(record)
        if record["val"] > self.selection.best_val:
            self.selection.best_val, self.selection.best_step = record["val"], self.step
            self.selection.best_state = copy.deepcopy(self.model.state_dict())

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        if self.checkpointing is None:
            return False
        every = self.checkpointing.every
        return (self.step == self.total_steps or self.step % self.steps_per_epoch == 0
                or (every > 0 and self.step % every == 0))

    def _last_good(self) -> str:
        if self.saved_step is None or self.checkpointing is None:
            return "no checkpoint had been written"
        return f"the last good checkpoint (step {self.saved_step}) is kept at {self.checkpointing.path}"

    def save_checkpoint(self) -> None:
        """Write the resumable state (rank 0; atomically, so a kill mid-write keeps the last one)."""
        if self.world.is_main:
            state = self.state_dict()
            state.pop("model")  # stored once, as the checkpoint's own weights
            write_training_checkpoint(self.checkpointing, self.model, state)
        self.saved_step = self.step

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "augment": self.augment.state_dict() if self.augment is not None else None,
            "callbacks": [callback.state_dict() if hasattr(callback, "state_dict") else None
                          for callback in self.callbacks],
            "selection": dict(vars(self.selection)),  # not asdict(): it would deep-copy the best weights
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config) or state["total_steps"] != self.total_steps:
            raise QtoolError("the checkpoint was written by a run with different training settings; "
                             "resume with the options of the interrupted run")
        if len(state["callbacks"]) != len(self.callbacks):
            raise QtoolError(f"the checkpoint holds {len(state['callbacks'])} callback states, "
                             f"this method has {len(self.callbacks)} callbacks")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])
        for callback, callback_state in zip(self.callbacks, state["callbacks"]):
            if callback_state is not None:
                callback.load_state_dict(callback_state)
        self.selection = Selection(**state["selection"])
        set_rng_state(state["rng"])
        self.step = self.saved_step = state["step"]

    def callback_reports(self) -> dict:
        merged: dict = {}
        for callback in self.callbacks:
            report = getattr(callback, "report", None)
            if report is not None:
                merged.update(report())
        return merged
