"""Helpers of the kernel tests (a plain module: tests/ is not a package)."""

from __future__ import annotations

import contextlib

import pytest
import torch

ISAS = ("avx512", "avx2", "scalar")


def register_every_op_family():
    """Import the modules that register the qtool ops (``qtool.native.library.register``)."""
    from qtool.lowbit import fused_reference, ops  # noqa: F401
    from qtool.quant import fake_quant, sign_estimator  # noqa: F401


@contextlib.contextmanager
def using_isa(ops, name: str):
    """Run the CPU kernels on ``name`` inside the block; skip when this CPU lacks it."""
    if name not in ops.supported_isas():
        pytest.skip(f"this CPU cannot run the {name} kernels (it runs {ops.supported_isas()})")
    ops.set_isa(name)
    try:
        yield name
    finally:
        ops.set_isa("auto")


def assert_float_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Float results within 1e-5 relative to the magnitude of the result (sums in another order
    can differ by a few ulps of the largest partial sums, so the scale is the output's peak)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    peak = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(peak, 1e-30))


def runnable_isas(ops) -> list[str]:
    """The ISAs this CPU runs (for tests that loop over them inside one example)."""
    return [name for name in ISAS if name in ops.supported_isas()]
