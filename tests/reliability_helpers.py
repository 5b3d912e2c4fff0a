"""Shared by the reliability tests (distributed, resume, hostile inputs)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def write_tiny_npz(path: Path, domains: int = 3, images: int = 40, size: int = 28, classes: int = 4) -> str:
    """A tiny multi-domain .npz (noise images, random labels): enough for gradients, batches and
    BatchNorm statistics, small enough to train in a second."""
    rng = np.random.default_rng(0)
    arrays = {}
    for d in range(domains):
        arrays[f"d{d}_x"] = rng.integers(0, 256, (images, size, size, 1), dtype=np.uint8)
        arrays[f"d{d}_y"] = rng.integers(0, classes, images).astype(np.int64)
    np.savez(path, **arrays)
    return str(path)


@contextmanager
def one_thread():
    """Train in-process on one thread (as the CLI tests' --threads 1), then give the test session
    its thread count back: tiny models only lose to thread synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
