"""Build-once, load-fast C++/CUDA extensions, with a quiet fallback.

Extensions are JIT-compiled by ``torch.utils.cpp_extension.load`` into a persistent cache
(``$QTOOL_CACHE/extensions``, default ``~/.cache/qtool/extensions``): the first use compiles,
later uses load the cached library. Never inside pip's isolated build environment. When the
build or the load fails, or ``QTOOL_NO_EXTENSIONS=1``, callers get ``None`` and one notice
line on stderr, and use their pure-PyTorch reference.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))
    return root / "extensions"


def kernel_source(relative: str) -> Path:
    """A file under ``kernels/``: inside the installed package, or in the source checkout."""
    here = Path(__file__).resolve().parent
    for root in (here / "_kernels", here.parent / "kernels"):
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(f"kernel source kernels/{relative} is not installed")


def notice(message: str) -> None:
    print(f"qtool: {message}", file=sys.stderr)


def _import_library(name: str, library: Path):
    import importlib.util

    import torch  # noqa: F401 - the library links against torch's, which must be loaded first

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(name: str, sources: list[str], extra_cflags: list[str] | None = None, **kwargs):
    """The compiled module, or ``None`` (after one notice) when it cannot be built or loaded."""
    if name in _loaded:
        return _loaded[name]
    module = None
    if os.environ.get("QTOOL_NO_EXTENSIONS") == "1":
        notice(f"{name}: extensions disabled by QTOOL_NO_EXTENSIONS=1; using the PyTorch reference")
    else:
        try:
            from torch.utils.cpp_extension import load

            import torch

            paths = [kernel_source(s) for s in sources]
            flags = extra_cflags or ["-O3"]
            # One build folder per (sources, their location, flags, torch): checkouts and torch
            # versions never rebuild each other's libraries.
            digest = hashlib.sha256(repr((flags, sorted(kwargs.items()), torch.__version__)).encode())
            for path in paths:
                digest.update(str(path).encode() + path.read_bytes())
            build = cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
            library = build / f"{name}.so"
            if library.exists():  # the folder's name already proves it is current: skip ninja
                module = _import_library(name, library)
            else:
                build.mkdir(parents=True, exist_ok=True)
                module = load(name=name, sources=[str(p) for p in paths], extra_cflags=flags,
                              build_directory=str(build), verbose=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any build/load failure falls back
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notice(f"{name}: C++ extension unavailable ({reason[:160]}); using the PyTorch reference")
    _loaded[name] = module
    return module
