"""Shared fixtures of the kernel tests.

The first test to ask for ``qops`` builds the extension into the cache (once per session, and
once per clean machine: about 30-60 s on two cores); later runs only load it.
"""

from __future__ import annotations

import pytest

from lowbit_testing import ISAS, register_every_op_family, using_isa


@pytest.fixture(scope="session")
def qops():
    """``qtool.lowbit.ops`` with the compiled library loaded and every op family registered
    (fails, never skips, without it)."""
    from qtool.lowbit import ops

    register_every_op_family()
    assert ops.backend() == "extension", "the op library did not build; see `python -m qtool.native.build -v`"
    return ops


@pytest.fixture(params=ISAS)
def isa(request, qops):
    """Parametrizes a test over every ISA build of the CPU kernels."""
    with using_isa(qops, request.param) as name:
        yield name
