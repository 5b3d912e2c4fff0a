"""qtool checkpoints: the zoo architecture, the quantization plan and the weights.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a file never runs code from it. Files are written
atomically (temporary name, fsync, rename), so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from qtool.atomic import atomic_path, write_text_atomic  # noqa: F401  (re-exported: callers import them from here)
from qtool.errors import QtoolError
from qtool.models import ZOO, build_model
from qtool.quant.prepare import apply_plan

FORMAT = "qtool-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str, num_classes: int, in_channels: int,
                    image_size: int, meta: dict) -> None:
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
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtoolError(f"cannot read checkpoint {path}: corrupt or not a qtool checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QtoolError(f"{path} is not a qtool checkpoint")
    if payload.get("version") != VERSION:
        raise QtoolError(f"{path} has checkpoint version {payload.get('version')}; this qtool reads {VERSION}")
    if payload.get("arch") not in ZOO:
        raise QtoolError(f"{path} names an unknown architecture {payload.get('arch')!r}")
    return payload


def model_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the architecture, apply the stored quantization plan, load the weights."""
    model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"])
    if payload.get("plan"):
        apply_plan(model, payload["plan"])
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
