"""Deprecated: the training ops joined the one op library (``qtool.native``).

Builds, caches and switches nothing. It only keeps ``qtool/quant/binary.py`` working until that
module calls ``qtool.quant.sign_estimator.sign_with_estimator`` itself; then delete this file.
"""

from __future__ import annotations

from types import SimpleNamespace


def load_extension(name: str, *_, **__):
    """The sign-estimator kernels of the one library under their old names, or ``None`` when
    only the PyTorch reference runs."""
    import torch

    from qtool.native import library
    from qtool.quant import sign_estimator  # noqa: F401 - registers the ops

    if name != "qtool_sign_estimator" or library.load() != "extension":
        return None
    # reste_sign's o, t, m serve its backward only: any valid values do for the forward.
    return SimpleNamespace(sign_forward=lambda z: torch.ops.qtool.reste_sign(z, 1.0, 1.0, 0.5),
                           sign_backward=torch.ops.qtool.reste_sign_backward)
