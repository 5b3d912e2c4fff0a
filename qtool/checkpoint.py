"""qtool checkpoints: the zoo architecture, the quantization plan and the weights.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a file never runs code from it. Files are written
atomically (temporary name, fsync, rename), so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from qtool.atomic import atomic_path, write_text_atomic  # noqa: F401  (re-exported; new code imports qtool.atomic)
from qtool.errors import QtoolError
from qtool.models import ZOO, build_model
from qtool.quant.prepare import apply_plan

FORMAT = "qtool-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str, num_classes: int, in_channels: int,
                    image_size: int, meta: dict, training: dict | None = None) -> None:
    """``training``: a trainer's resumable state (``qtool.train.resume``), for training checkpoints."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "plan": getattr(model, "qtool_plan", None),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if training is not None:
        payload["training"] = training
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dictionary, or a one-line ``QtoolError`` for a missing/corrupt/foreign file."""
    path = Path(path)
    if not path.exists():
        raise QtoolError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise QtoolError(f"checkpoint {path} is a directory; pass the model.pt inside it")
    try:
        _check_integrity(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise QtoolError(f"refusing checkpoint {path}: it holds Python objects{what}, not only tensors and plain "
                         "values, and loading those could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtoolError(f"cannot read checkpoint {path}: corrupt or not a qtool checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QtoolError(f"{path} is not a qtool checkpoint")
    if payload.get("version") != VERSION:
        raise QtoolError(f"{path} has checkpoint version {payload.get('version')}; this qtool reads {VERSION}")
    if payload.get("arch") not in ZOO:
        raise QtoolError(f"{path} names an unknown architecture {payload.get('arch')!r}")
    return payload


def _check_integrity(path: Path) -> None:
    """Verify the CRC-32 of every record: ``torch.load`` does not, so a flipped bit inside the
    tensor data would otherwise load silently as a different weight. (This catches corruption,
    not a deliberate edit that recomputes the CRCs; ``weights_only`` is what keeps such a file
    from running code.)"""
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(f"record {damaged.rsplit('/', 1)[-1]} fails its CRC-32 check")


def model_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the architecture, apply the stored quantization plan, load the weights."""
    model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"])
    if payload.get("plan"):
        try:
            model = apply_plan(model, payload["plan"])
        except (ValueError, KeyError, TypeError) as exc:  # a plan naming layers or kinds the model lacks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QtoolError(f"the checkpoint's quantization plan does not fit the {payload['arch']} "
                             f"architecture: {first[:200]}") from None
        model.qtool_plan = payload["plan"]
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QtoolError(f"checkpoint weights do not match the {payload['arch']} architecture: {first[:200]}") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload), payload
