"""``qtool export SOURCE``: load the model, pick calibration and verification images, export.

SOURCE is a qtool checkpoint (``model.pt``), or ``FILE.py:FUNCTION`` / ``package.module:FUNCTION``
returning an ``nn.Module`` (a Brevitas model, or any model ``qtool.prepare`` accepts) with an
optional ``--weights`` state dict. Images come from ``--data``: calibration from the source
domains' training part, verification from the held-out domain (the checkpoint's
``--target-domain`` unless another is named), the split the trainer used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.exporters.export import ExportResult, check_output_path, export


@dataclass
class ExportOptions:
    source: str
    out: str
    data: str | None = None
    target_domain: str | None = None
    verify: int = 0
    calibration: int = 512
    weight_storage: str = "int8"
    numerics: str = "faithful"
    opset: int | None = None
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    threads: int = 1
    seed: int = 0
    verify_cpu: tuple[str, ...] = ()


@dataclass
class LoadedModel:
    model: nn.Module
    input_shape: tuple[int, ...]
    data: str | None = None          # what the checkpoint was trained on
    target_domain: str | None = None
    holdout: float = 0.2
    seed: int = 0


def load_source(options: ExportOptions) -> LoadedModel:
    if ":" in options.source and not Path(options.source).exists():
        return _load_factory(options)
    from qtool.checkpoint import load_model

    model, payload = load_model(options.source)
    trained = payload.get("meta", {}).get("options", {})
    size = payload["image_size"]
    return LoadedModel(model, (payload["in_channels"], size, size), trained.get("data"), trained.get("target_domain"),
                       trained.get("holdout", 0.2), trained.get("seed", 0))


def _load_factory(options: ExportOptions) -> LoadedModel:
    target, _, function = options.source.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise QtoolError(f"model file not found: {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise QtoolError(f"cannot import {target}: {exc}") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise QtoolError(f"{target} has no function {function!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise QtoolError(f"{options.source} returned {type(model).__name__}, not a torch.nn.Module")
    if options.weights:
        try:
            state = torch.load(options.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, KeyError) as exc:
            raise QtoolError(f"cannot load --weights {options.weights}: {str(exc).splitlines()[0][:200]}") from None
    if options.input_shape is None:
        raise QtoolError("--input-shape C,H,W is needed for a model built by a function")
    return LoadedModel(model.eval(), tuple(options.input_shape))


def _images(options: ExportOptions, loaded: LoadedModel):
    """(calibration, verification, labels) tensors of normalized images from --data."""
    from qtool.data import Domain, load_domains, normalize, split_domains

    spec = options.data or loaded.data
    if spec is None:
        raise QtoolError("--data is needed to calibrate residual joins and to verify")
    channels, size = loaded.input_shape[0], loaded.input_shape[-1]
    data = load_domains(spec, size)
    if data.channels != channels:
        raise QtoolError(f"the model takes {channels}-channel images; {spec} has {data.channels}")
    target = options.target_domain or (loaded.target_domain if spec == loaded.data else None)
    split = split_domains(data, target, loaded.holdout, loaded.seed)
    generator = torch.Generator().manual_seed(options.seed)

    def sample(images: torch.Tensor, labels: torch.Tensor, count: int):
        index = torch.randperm(len(labels), generator=generator)[:count]
        return normalize(images[index]), labels[index]

    sources = list(split.train.values())
    train_images = torch.cat([d.images for d in sources])
    train_labels = torch.cat([d.labels for d in sources])
    calibration, _ = sample(train_images, train_labels, options.calibration)
    if split.target is not None:
        held_out = split.target
    else:  # no held-out domain: verify on the sources' validation part
        held_out = Domain("source validation", torch.cat([d.images for d in split.val.values()]),
                          torch.cat([d.labels for d in split.val.values()]))
    verify, labels = sample(held_out.images, held_out.labels, options.verify) if options.verify else (None, None)
    return calibration, verify, labels, held_out.name


def export_source(options: ExportOptions) -> tuple[ExportResult, str | None]:
    """Export SOURCE to ``options.out``; returns the result and the verification domain."""
    if options.verify < 0 or options.calibration < 1:
        raise QtoolError("--verify must be >= 0 and --calibration >= 1")
    check_output_path(options.out)
    loaded = load_source(options)
    calibration, verify, labels, domain = _images(options, loaded)
    example = calibration[:1]
    result = export(loaded.model, example, options.out, verify=verify, labels=labels, calibration=calibration,
                    weight_storage=options.weight_storage, opset=options.opset, numerics=options.numerics,
                    threads=options.threads, verify_cpus=options.verify_cpu)
    return result, domain if verify is not None else None
