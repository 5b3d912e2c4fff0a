"""``qtool quantize`` and ``qtool eval`` as plain functions: data -> model -> train -> report.

The CLI parses and prints; everything that decides something lives here or below.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qtool import __version__
from qtool.checkpoint import load_model, read_checkpoint, save_checkpoint, model_from_checkpoint, write_text_atomic
from qtool.data import DomainSet, Split, load_domains, split_domains
from qtool.errors import QtoolError
from qtool.evaluate import split_accuracies
from qtool.models import ZOO, build_model
from qtool.options import VALID_BITS, QuantizeOptions
from qtool.quant.prepare import prepare
from qtool.train.methods import get_method, method_names
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
    if options.bits == 1 and not method.binary:
        raise QtoolError(f"--bits 1 needs a binary estimator: --method {' or '.join(n for n in names if get_method(n).binary) or 'ste/reste'}")
    if options.pretrain_method not in ("plain", "sam", "gsam", "sagm"):
        raise QtoolError(f"--pretrain-method must be plain, sam, gsam or sagm, got {options.pretrain_method!r}")
    if options.first_last_bits not in (None, 2, 3, 4, 8):
        raise QtoolError(f"--first-last-bits must be 2, 3, 4, 8 or 0 (float), got {options.first_last_bits}")
    if options.epochs <= 0 and not options.steps:
        raise QtoolError("--epochs must be positive")
    if options.batch_size < 2:
        raise QtoolError("--batch-size must be at least 2")
    _check_writable(options.out)
    if options.model not in ZOO and not Path(options.model).is_file():
        raise QtoolError(f"unknown model {options.model!r}: use one of {', '.join(ZOO)} or a qtool checkpoint path")


def _check_writable(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise QtoolError(f"--out {out} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".qtool-write-test"):
            pass
    except OSError as exc:
        raise QtoolError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


# -- full-precision pre-training, cached ---------------------------------------------------

def _data_identity(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return spec


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


def pretrain_key(options: QuantizeOptions, data: DomainSet) -> str:
    key = {
        "arch": options.model, "data": _data_identity(options.data), "image_size": data.image_size,
        "target": options.target_domain, "holdout": options.holdout, "config": asdict(pretrain_config(options)),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def full_precision_model(options: QuantizeOptions, data: DomainSet, split: Split, progress) -> tuple[nn.Module, dict]:
    """The FP starting point: a user's checkpoint, or a zoo model pre-trained on the sources
    (read from the cache when this model/data/target/seed/config was trained before)."""
    if options.model not in ZOO:
        model, payload = load_model(options.model)
        if payload.get("plan"):
            raise QtoolError(f"{options.model} is already quantized; start from a full-precision checkpoint")
        if payload["num_classes"] != data.num_classes or payload["in_channels"] != data.channels:
            raise QtoolError(f"{options.model} was trained for {payload['num_classes']} classes and "
                             f"{payload['in_channels']} channels; the data has {data.num_classes} and {data.channels}")
        return model, {"checkpoint": str(options.model), **split_accuracies(model, split)}

    cached = _cache_root(options) / f"{options.model}-{pretrain_key(options, data)}.pt"
    if options.use_cache and cached.exists():
        try:
            payload = read_checkpoint(cached)
            progress({"phase": "pretrain", "cached": str(cached)})
            return model_from_checkpoint(payload), payload["meta"]["report"]
        except QtoolError:
            pass  # a damaged cache entry is retrained and overwritten
    torch.manual_seed(options.seed)
    model = build_model(options.model, data.num_classes, data.channels)
    trainer = Trainer(model, split, pretrain_config(options), progress=lambda r: progress({"phase": "pretrain", **r}))
    progress({"phase": "pretrain", "total": trainer.total_steps})
    result = trainer.fit()
    report = {**split_accuracies(model, split), "steps": result.steps, "seconds": result.seconds}
    if options.use_cache:
        save_checkpoint(cached, model, options.model, data.num_classes, data.channels, data.image_size,
                        {"report": report, "kind": "pretrain"})
    return model, report


# -- quantize -----------------------------------------------------------------------------

def quantize(options: QuantizeOptions, progress: Callable[[dict], None] = lambda record: None) -> dict:
    validate(options)
    start = time.perf_counter()
    data = load_domains(options.data, options.image_size)
    split = split_domains(data, options.target_domain, options.holdout, options.seed)
    method = get_method(options.method)
    model, fp_report = full_precision_model(options, data, split, progress)
    arch = options.model if options.model in ZOO else read_checkpoint(options.model)["arch"]

    act_bits = options.act_bits if options.act_bits is not None else options.bits
    torch.manual_seed(options.seed)
    if options.bits == 32:
        qmodel = model
    elif options.bits == 1:
        from qtool.quant.binary import prepare_binary  # lands with the binary-network work

        qmodel = prepare_binary(model, **method.options, **options.method_options)
    else:
        qmodel = prepare(model, options.bits, act_bits, options.first_last_bits, inplace=True)

    config = TrainConfig(
        epochs=options.epochs, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
        weight_decay=options.weight_decay, optimizer=method.optimizer, rho=options.rho, alpha=options.alpha,
        seed=options.seed, augment=options.augment, evals=options.evals,
    )
    trainer = Trainer(qmodel, split, config, progress=lambda r: progress({"phase": "qat", **r}))
    if method.setup is not None:
        trainer.callbacks = method.setup(qmodel, trainer, {**method.options, **options.method_options})
    progress({"phase": "qat", "total": trainer.total_steps})
    result = trainer.fit()

    report = {
        "model": arch, "method": options.method, "bits": options.bits, "act_bits": act_bits, "seed": options.seed,
        "target_domain": options.target_domain, "source_domains": split.source_names,
        **split_accuracies(qmodel, split),
        "seconds": time.perf_counter() - start, "steps": result.steps,
        "full_precision": fp_report, "selected_step": result.best_step, "history": result.history,
        "data": options.data, "qtool_version": __version__,
        **trainer.callback_reports(),
    }
    out = Path(options.out)
    save_checkpoint(out / "model.pt", qmodel, arch, data.num_classes, data.channels, data.image_size,
                    {"report": _summary(report), "options": asdict(options)})
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    for callback in trainer.callbacks:  # e.g. GAQAT's heatmap, ReSTE's indicator plot
        if hasattr(callback, "write_artifacts"):
            callback.write_artifacts(out)
    return report


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
