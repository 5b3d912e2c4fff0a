"""The three ``--data`` formats, each read into ``{domain: (images uint8 NxHxWxC, labels int64 N)}``.

- ``rotated-digits``: scikit-learn's bundled handwritten digits, rotated DomainBed-style.
- ``PATH.npz``: keys ``<domain>_x`` / ``<domain>_y``.
- ``DIR``: ``DIR/<domain>/<class>/*.png|jpg|jpeg`` (PACS, VLCS, OfficeHome, DomainNet layout).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError

RawDomains = dict[str, tuple[np.ndarray, np.ndarray]]

ROTATED_DIGITS = "rotated-digits"
ROTATION_ANGLES = (0, 15, 30, 45, 60, 75)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_rotated_digits(size: int = 28) -> RawDomains:
    """1,797 8x8 digits, upsampled to ``size`` and split round-robin into six environments,
    environment i rotated by ``ROTATION_ANGLES[i]`` degrees (DomainBed's RotatedMNIST recipe)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    labels = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed: the domains never change
    images = F.interpolate(images[order], size=(size, size), mode="bilinear", align_corners=False)
    labels = labels[order]
    domains: RawDomains = {}
    for env, angle in enumerate(ROTATION_ANGLES):
        picked = slice(env, None, len(ROTATION_ANGLES))
        rotated = _rotate(images[picked], angle)
        pixels = (rotated.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        domains[str(angle)] = (pixels, labels[picked])
    return domains


def _rotate(images, degrees: float):
    import math

    import torch
    import torch.nn.functional as F

    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = F.affine_grid(matrix.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def read_npz(path: Path) -> RawDomains:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise QtoolError(f"cannot read {path}: not a valid .npz archive ({exc})") from None
    names = sorted(key[: -len("_x")] for key in keys if key.endswith("_x") and key[:-2] + "_y" in keys)
    if not names:
        raise QtoolError(f"{path} holds no domains: expected keys '<domain>_x' and '<domain>_y'")
    domains: RawDomains = {}
    for name in names:
        try:
            images, labels = archive[f"{name}_x"], archive[f"{name}_y"]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise QtoolError(f"cannot read domain {name!r} of {path}: {exc}") from None
        domains[name] = _check_arrays(path, name, images, labels)
    return domains


def _check_arrays(path: Path, name: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}: domain {name!r}"
    if images.dtype != np.uint8:
        raise QtoolError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:  # N x H x W grey images
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise QtoolError(f"{where}: images must be N x H x W x C with C = 1 or 3, got shape {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise QtoolError(f"{where}: labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise QtoolError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise QtoolError(f"{where}: the domain is empty")
    if labels.min() < 0:
        raise QtoolError(f"{where}: labels must be non-negative, found {labels.min()}")
    return images, labels.astype(np.int64)


def read_image_folder(root: Path, size: int) -> RawDomains:
    from PIL import Image, UnidentifiedImageError

    domain_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domain_dirs:
        raise QtoolError(f"{root} holds no domain folders: expected {root}/<domain>/<class>/*.png")
    classes = sorted({c.name for d in domain_dirs for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not classes:
        raise QtoolError(f"{root} holds no class folders: expected {root}/<domain>/<class>/*.png")
    index = {name: i for i, name in enumerate(classes)}
    domains: RawDomains = {}
    for domain in domain_dirs:
        images, labels = [], []
        for class_dir in sorted(c for c in domain.iterdir() if c.is_dir() and c.name in index):
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(file) as image:
                        pixels = image.convert("RGB").resize((size, size), Image.BILINEAR)
                        images.append(np.asarray(pixels, dtype=np.uint8))
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise QtoolError(f"cannot decode image {file}: {exc}") from None
                labels.append(index[class_dir.name])
        if images:
            domains[domain.name] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    if not domains:
        raise QtoolError(f"{root} holds no images (*.png, *.jpg, *.jpeg) under <domain>/<class>/")
    return domains


def read_raw(spec: str, image_size: int | None) -> RawDomains:
    """Dispatch on the ``--data`` value."""
    if spec == ROTATED_DIGITS:
        return read_rotated_digits(image_size or 28)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise QtoolError(f"data not found: {spec!r} (use 'rotated-digits', a .npz archive or an image folder)")
    if path.is_dir():
        return read_image_folder(path, image_size or 64)
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    raise QtoolError(f"unsupported data file {spec!r}: expected a .npz archive or a folder")
