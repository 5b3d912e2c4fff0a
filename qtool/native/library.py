"""Loads ``torch.ops.qtool`` once per process: the compiled library, or the PyTorch reference.

``load()`` decides once: the compiled library from the cache (built there on first use, see
``build``), unless ``QTOOL_KERNELS=reference`` forces the reference. When the build or the load
fails, one notice line goes to stderr and every op runs its pure-PyTorch reference, under the
same name and with the same numbers.

Each op family hands its schemas and reference kernels to ``register``. The reference becomes
the op's kernel on every device without the library, and on the devices the library has no
kernel for with it (CUDA tensors when the build had no CUDA toolkit, for instance).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from qtool.native import build

SWITCH = "QTOOL_KERNELS"  # =reference forces the pure-PyTorch reference
DEPRECATED_SWITCH = "QTOOL_NO_EXTENSIONS"  # =1: the old name of the same switch

SCHEMAS: dict[str, str] = {}  # every registered op, name -> schema (C++'s, without "qtool::")
REFERENCE: dict[str, Callable] = {}  # name -> its pure-PyTorch kernel

_backend: str | None = None
_libraries: list[torch.library.Library] = []  # registrations last as long as these objects


def notice(message: str) -> None:
    print(f"qtool: {message}", file=sys.stderr)


def load() -> str:
    """``"extension"`` when the compiled library is loaded, else ``"reference"``."""
    global _backend
    if _backend is None:
        _backend = "reference" if _reference_forced() else _load_compiled()
    return _backend


def _reference_forced() -> bool:
    if os.environ.get(DEPRECATED_SWITCH) == "1":
        notice(f"{DEPRECATED_SWITCH}=1 is deprecated; set {SWITCH}=reference instead")
        return True
    return os.environ.get(SWITCH, "").lower() == "reference"


def _load_compiled() -> str:
    try:
        build.build_kernels()
        return "extension"
    except Exception as error:  # noqa: BLE001 - any build or load failure: run the reference instead
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        notice(f"compiled kernels unavailable ({type(error).__name__}: {reason[:160]}); using the pure-PyTorch "
               "reference for every qtool op (run `qtool build-kernels -v` for the build log)")
        return "reference"


def register(schemas: dict[str, str], reference: dict[str, Callable]) -> None:
    """Make an op family callable as ``torch.ops.qtool.<name>`` on either backend: without the
    compiled library, define its schemas here; with it, the library already has."""
    compiled = load() == "extension"
    library = torch.library.Library("qtool", "IMPL" if compiled else "FRAGMENT")
    for name, schema in schemas.items():
        if not compiled:
            library.define(schema)
        library.impl(name, reference[name], "CompositeExplicitAutograd")
    _libraries.append(library)
    SCHEMAS.update(schemas)
    REFERENCE.update(reference)
