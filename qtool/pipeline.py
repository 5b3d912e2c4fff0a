"""``qtool quantize`` and ``qtool eval`` as plain functions: data -> model -> train -> report.

The CLI parses and prints; everything that decides something lives here or below. Under
torchrun every rank runs ``quantize`` (data-parallel training, ``qtool.train.distributed``) and
rank 0 alone writes files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qtool import __version__
from qtool.checkpoint import load_model, read_checkpoint, save_checkpoint, model_from_checkpoint, write_text_atomic
from qtool.runs import checkpoint_path, resumable_checkpoint, resumed_options, training_state
from qtool.data import DomainSet, Split, load_domains, split_domains
from qtool.errors import QtoolError
from qtool.evaluate import split_accuracies
from qtool.models import ZOO, build_model
from qtool.options import VALID_BITS, QuantizeOptions
from qtool.quant.prepare import prepare
from qtool.train.methods import get_method, method_names
from qtool.train.optim import check_optimizer
from qtool.train.distributed import DEVICES, World, joined_world
from qtool.train.resume import Checkpointing
from qtool.train.convergence import RULE, convergence, write_curve_plot
from qtool.train.trainer import TrainConfig, Trainer

def validate(options: QuantizeOptions) -> None:
    """Reject a bad request before any data is read or any time is spent training."""
    if options.bits not in VALID_BITS:
        raise QtoolError(f"--bits must be one of 1, 2, 3, 4, 8 (or 32 for full precision), got {options.bits}")
    act_bits = options.act_bits if options.act_bits is not None else options.bits
    if options.bits == 1 and act_bits != 1:
        raise QtoolError("binary networks (--bits 1) binarize activations too: --act-bits must be 1")
    if options.bits not in (1, 32) and act_bits not in (2, 3, 4, 8):
        raise QtoolError(f"--act-bits must be one of 2, 3, 4, 8, got {act_bits}")
    names = method_names()
    if options.method not in names:
        raise QtoolError(f"unknown method {options.method!r}; choose from {', '.join(names)}")
    method = get_method(options.method)
    if method.binary and options.bits != 1:
        raise QtoolError(f"method {options.method!r} trains binary networks: use --bits 1")
    if method.check_options is not None:
        method.check_options({**method.options, **options.method_options})
    elif options.method_options:
        raise QtoolError(f"method {options.method} takes no -O options, got {', '.join(sorted(options.method_options))}")
    if options.bits == 1 and not method.binary:
        raise QtoolError(f"--bits 1 needs a binary estimator: --method {' or '.join(n for n in names if get_method(n).binary) or 'ste/reste'}")
    if options.bits == 1:
        from qtool.quant.binarize import check_binary_request

        check_binary_request(options.model, method.options, options.method_options)
    check_optimizer(options.pretrain_method, "--pretrain-method")
    if options.first_last_bits not in (None, 2, 3, 4, 8):
        raise QtoolError(f"--first-last-bits must be 2, 3, 4, 8 or 0 (float), got {options.first_last_bits}")
    if options.epochs <= 0 and not options.steps:
        raise QtoolError("--epochs must be positive")
    if options.batch_size < 2:
        raise QtoolError("--batch-size must be at least 2")
    if options.threads is not None and options.threads < 1:
        raise QtoolError(f"--threads must be at least 1, got {options.threads}")
    if options.checkpoint_every < 0:
        raise QtoolError(f"--checkpoint-every must be 0 (epoch ends only) or positive, got {options.checkpoint_every}")
    if options.device not in DEVICES:
        raise QtoolError(f"--device must be one of {', '.join(DEVICES)}, got {options.device!r}")
    _check_writable(options.out)
    if options.model not in ZOO and not Path(options.model).is_file():
        raise QtoolError(f"unknown model {options.model!r}: use one of {', '.join(ZOO)} or a qtool checkpoint path")


def _check_writable(out: str) -> None:
    """Fail now, not after hours of training, when --out cannot be written; create nothing
    (a run that fails before its first checkpoint leaves no folder behind)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise QtoolError(f"--out {out} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise QtoolError(f"cannot write to --out {out}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".qtool-write-test"):
            pass
    except OSError as exc:
        raise QtoolError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


# -- full-precision pre-training, cached ---------------------------------------------------

def _data_identity(spec: str) -> str:
    """What the pre-training cache and a resumed run compare data by: an archive's content (a
    re-created or moved copy of the same file keeps its cache; a changed one does not), a
    folder's path, size and time, or the name of a built-in dataset."""
    path = Path(spec).expanduser()
    if path.is_file():
        return f"sha256:{_file_digest(path.resolve(), path.stat().st_size, path.stat().st_mtime_ns)}"
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return spec


@functools.lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:  # size and time: a rewritten file is read again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_root(options: QuantizeOptions) -> Path:
    if options.cache_dir:
        return Path(options.cache_dir)
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool")) / "pretrain"


def pretrain_config(options: QuantizeOptions) -> TrainConfig:
    return TrainConfig(
        epochs=options.pretrain_epochs, batch_size=options.batch_size, lr=options.pretrain_lr,
        weight_decay=options.weight_decay, optimizer=options.pretrain_method, rho=options.rho,
        alpha=options.alpha, seed=options.seed, augment=options.augment, evals=options.evals,
    )


# The options that decide the full-precision start; the cache key is made of these alone (not of
# qtool's version), so a later run from another checkout with the same settings reuses the model.
PRETRAIN_SETTINGS = ("model", "target_domain", "holdout", "seed", "batch_size", "pretrain_epochs", "pretrain_method",
                     "pretrain_lr", "weight_decay", "rho", "alpha", "augment", "evals")


def _canonical(value):
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def pretrain_key(options: QuantizeOptions, data: DomainSet) -> str:
    # numbers as floats: --pretrain-epochs 10 and 10.0 are the same setting
    key = {name: _canonical(getattr(options, name)) for name in PRETRAIN_SETTINGS}
    key.update(data=_data_identity(options.data), image_size=data.image_size)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _checkpointing(options: QuantizeOptions, phase: str, data: DomainSet, arch: str, identity: dict) -> Checkpointing | None:
    if not options.checkpoints:
        return None
    header = {"arch": arch, "num_classes": data.num_classes, "in_channels": data.channels, "image_size": data.image_size}
    meta = {"phase": phase, "options": asdict(options), **identity}
    return Checkpointing(checkpoint_path(options.out, phase), header, options.checkpoint_every, meta)


def _resume_state(options: QuantizeOptions, phase: str, identity: dict) -> dict | None:
    """The ``phase`` state saved by the interrupted run, checked against this run's data."""
    if not options.resume:
        return None
    payload = resumable_checkpoint(options.resume, phase)
    if payload is None:
        return None
    for key, value in identity.items():
        if payload["meta"].get(key) != value:
            raise QtoolError(f"cannot resume {checkpoint_path(options.resume, phase)}: the data or settings changed "
                             f"since the interrupted run ({key} differs)")
    return payload


def full_precision_model(options: QuantizeOptions, data: DomainSet, split: Split, progress,
                         world: World = World()) -> tuple[nn.Module, dict]:
    """The FP starting point: a user's checkpoint, or a zoo model pre-trained on the sources
    (read from the cache when this model/data/target/seed/config was trained before).

    Data-parallel runs pre-train data-parallel too (the same computation as one process, in
    less time); rank 0 decides whether the cache holds the model and alone writes it."""
    if options.model not in ZOO:
        model, payload = load_model(options.model)
        if payload.get("plan"):
            raise QtoolError(f"{options.model} is already quantized; start from a full-precision checkpoint")
        if payload["num_classes"] != data.num_classes or payload["in_channels"] != data.channels:
            raise QtoolError(f"{options.model} was trained for {payload['num_classes']} classes and "
                             f"{payload['in_channels']} channels; the data has {data.num_classes} and {data.channels}")
        return model, {"checkpoint": str(options.model), **split_accuracies(model, split, world)}

    key = pretrain_key(options, data)
    cached = _cache_root(options) / f"{options.model}-{key}.pt"
    if world.broadcast(options.use_cache and world.is_main and _readable(cached)):
        payload = read_checkpoint(cached)
        progress({"phase": "pretrain", "cached": str(cached)})
        return model_from_checkpoint(payload), payload["meta"]["report"]
    identity = {"pretrain_key": key}
    torch.manual_seed(options.seed)
    model = build_model(options.model, data.num_classes, data.channels)
    trainer = Trainer(model, split, pretrain_config(options), progress=lambda r: progress({"phase": "pretrain", **r}),
                      world=world, checkpointing=_checkpointing(options, "pretrain", data, options.model, identity))
    progress({"phase": "pretrain", "total": trainer.total_steps})
    resume = _resume_state(options, "pretrain", identity)
    result = trainer.fit(resume=training_state(resume) if resume else None)
    report = {**split_accuracies(model, split, world), "steps": result.steps, "seconds": result.seconds,
              "pretrain_key": key, "convergence": convergence(result.history, trainer.budget)}
    if options.use_cache and world.is_main:
        save_checkpoint(cached, model, options.model, data.num_classes, data.channels, data.image_size,
                        {"report": report, "kind": "pretrain"})
    return model, report


def _readable(path: Path) -> bool:
    """Whether ``path`` is an intact checkpoint (a damaged cache entry is retrained and overwritten)."""
    try:
        read_checkpoint(path)
        return True
    except QtoolError:
        return False


# -- quantize -----------------------------------------------------------------------------

def quantize(options: QuantizeOptions, progress: Callable[[dict], None] = lambda record: None,
             explicit: set[str] | None = None) -> dict:
    """Train and write ``options.out``. ``options.resume`` continues an interrupted run (with
    ``explicit``, the options the user gave again, checked by ``qtool.runs.resumed_options``)."""
    if options.resume:
        options = resumed_options(options, explicit)
    validate(options)
    options = _with_threads(options)
    with joined_world(options.device) as world:
        return _quantize(options, progress if world.is_main else lambda record: None, world)


def _with_threads(options: QuantizeOptions) -> QuantizeOptions:
    """Apply ``--threads`` and record the count: it changes float summation order, and a resumed
    run reproduces the uninterrupted one bit for bit only with the same order."""
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    return replace(options, threads=torch.get_num_threads())


def pretrain(options: QuantizeOptions, progress: Callable[[dict], None] = lambda record: None) -> dict:
    """Only the cached full-precision pre-training that ``quantize`` starts from (a benchmark's
    pre-training phase): trains and caches it unless the cache holds it and returns its report.
    ``options.resume`` (a run folder) continues an interrupted pre-training from its checkpoint."""
    validate(options)
    options = _with_threads(options)
    with joined_world(options.device) as world:
        data = load_domains(options.data, options.image_size)
        split = split_domains(data, options.target_domain, options.holdout, options.seed)
        _, report = full_precision_model(options, data, split, progress if world.is_main else lambda r: None, world)
    return report


def _quantize(options: QuantizeOptions, progress: Callable[[dict], None], world: World) -> dict:
    start = time.perf_counter()
    data = load_domains(options.data, options.image_size)
    split = split_domains(data, options.target_domain, options.holdout, options.seed)
    method = get_method(options.method)
    act_bits = options.act_bits if options.act_bits is not None else options.bits
    identity = {"data_identity": _data_identity(options.data)}
    resume = _resume_state(options, "qat", identity)
    if resume is not None:  # the QAT state holds the quantized model: no need for the FP one
        qmodel, fp_report, arch = model_from_checkpoint(resume), resume["meta"]["fp_report"], resume["arch"]
    else:
        model, fp_report = full_precision_model(options, data, split, progress, world)
        arch = options.model if options.model in ZOO else read_checkpoint(options.model)["arch"]
        qmodel = _quantized(model, options, method, act_bits)

    config = TrainConfig(
        epochs=options.epochs, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
        weight_decay=options.weight_decay, optimizer=method.optimizer, rho=options.rho, alpha=options.alpha,
        seed=options.seed, augment=options.augment, evals=options.evals,
    )
    checkpointing = _checkpointing(options, "qat", data, arch, {**identity, "fp_report": fp_report})
    trainer = Trainer(qmodel, split, config, progress=lambda r: progress({"phase": "qat", **r}),
                      world=world, checkpointing=checkpointing)
    if method.setup is not None:
        trainer.callbacks = method.setup(qmodel, trainer, {**method.options, **options.method_options})
    progress({"phase": "qat", "total": trainer.total_steps})
    result = trainer.fit(resume=training_state(resume) if resume is not None else None)

    report = {
        "model": arch, "method": options.method, "bits": options.bits, "act_bits": act_bits, "seed": options.seed,
        "target_domain": options.target_domain, "source_domains": split.source_names,
        **split_accuracies(qmodel, split, world),
        "seconds": time.perf_counter() - start, "steps": result.steps,
        "throughput": {"images_per_second": result.images_per_second, "processes": world.size},
        "full_precision": fp_report, "selected_step": result.best_step, "history": result.history,
        "data": options.data, "qtool_version": __version__,
        "convergence": _convergence_report(fp_report, result, trainer),
        **trainer.callback_reports(),
    }
    if world.is_main:
        out = Path(options.out)
        write_curve_plot(out / "convergence.png", {k: v for k, v in report["convergence"].items() if k != "rule"})
        save_checkpoint(out / "model.pt", qmodel, arch, data.num_classes, data.channels, data.image_size,
                        {"report": _summary(report), "options": asdict(options)})
        write_text_atomic(out / "report.json", json.dumps(report, indent=2))
        for callback in trainer.callbacks:  # e.g. GAQAT's heatmap, ReSTE's indicator plot
            if hasattr(callback, "write_artifacts"):
                callback.write_artifacts(out)
    return report


def _convergence_report(fp_report: dict, result, trainer: Trainer) -> dict:
    """Both phases' model-selection curves with their verdict and budget (``qtool.train.convergence``);
    the pre-training entry is absent for a user's checkpoint and for cache entries older than the curve."""
    phases = {"rule": RULE}
    if "convergence" in fp_report:
        phases["pretrain"] = fp_report["convergence"]
    phases["qat"] = convergence(result.history, trainer.budget)
    return phases


def _quantized(model: nn.Module, options: QuantizeOptions, method, act_bits: int) -> nn.Module:
    """``model`` with the quantizers of ``--bits`` inserted (``--bits 32``: unchanged)."""
    torch.manual_seed(options.seed)
    if options.bits == 32:
        return model
    if options.bits == 1:
        from qtool.quant.binarize import prepare_binary

        return prepare_binary(model, **{**method.options, **options.method_options})
    return prepare(model, options.bits, act_bits, options.first_last_bits, inplace=True)


def _summary(report: dict) -> dict:
    keep = ("model", "method", "bits", "act_bits", "seed", "target_domain", "source_domains", "accuracy",
            "target_accuracy", "source_val_accuracy", "data")
    return {k: report[k] for k in keep}


# -- eval ---------------------------------------------------------------------------------

def evaluate_checkpoint(path: str, data_spec: str, target_domain: str | None = None) -> dict:
    """Accuracy of a checkpoint on every domain, with the training split when it is known.

    When ``--target-domain`` (or the one stored in the checkpoint) and the data match the
    training run, sources are scored on the same validation split the trainer held out, so the
    numbers reproduce the training report exactly."""
    model, payload = load_model(path)
    meta = payload.get("meta", {})
    trained = meta.get("options", {})
    data = load_domains(data_spec, payload["image_size"])
    if data.channels != payload["in_channels"]:
        raise QtoolError(f"the checkpoint expects {payload['in_channels']}-channel images, {data_spec} has {data.channels}")
    if data.num_classes > payload["num_classes"]:
        raise QtoolError(f"{data_spec} has {data.num_classes} classes; the checkpoint predicts {payload['num_classes']}")
    if target_domain is None and trained.get("data") == data_spec:
        target_domain = trained.get("target_domain")
    split = split_domains(data, target_domain, trained.get("holdout", 0.2), trained.get("seed", 0))
    report = meta.get("report", {})
    return {
        "model": payload["arch"], "method": report.get("method"), "bits": report.get("bits"),
        "act_bits": report.get("act_bits"), "seed": trained.get("seed"), "target_domain": target_domain,
        "source_domains": split.source_names, **split_accuracies(model, split), "checkpoint": str(path),
    }
