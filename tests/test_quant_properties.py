"""Property-based tests (hypothesis) of the LSQ integer grid and its quantize/dequantize round
trip: what the exporter stores (``quantize_int``) must be what training computed (the fake-quant
forward), for any bits, sign, scale and input. (Packed-weight pack/unpack round trips are
covered with the low-bit kernels.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qtool.native import library
from qtool.quant import fake_quant
from qtool.quant.lsq import LSQQuantizer, integer_range

bits_strategy = st.integers(2, 8)


@given(bits=bits_strategy, signed=st.booleans(), narrow=st.booleans())
def test_integer_grid(bits, signed, narrow):
    qmin, qmax = integer_range(bits, signed, narrow)
    if not signed:
        assert (qmin, qmax) == (0, 2**bits - 1)
        return
    assert qmax == 2 ** (bits - 1) - 1
    assert qmin == (-qmax if narrow else -qmax - 1)  # narrow: symmetric, so -code stays on the grid
    assert qmax - qmin + 1 == 2**bits - int(narrow)  # every code fits in `bits` two's-complement bits


@st.composite
def quantizer_cases(draw):
    bits, signed, narrow = draw(bits_strategy), draw(st.booleans()), draw(st.booleans())
    channels = draw(st.integers(1, 4))
    scale = draw(arrays(np.float32, channels, elements=st.floats(2.0**-10, 2.0**7, width=32)))
    x = draw(arrays(np.float32, (channels, draw(st.integers(1, 16))),
                    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)))
    return bits, signed, narrow, torch.from_numpy(scale), torch.from_numpy(x)


def _quantizer(bits: int, signed: bool, narrow: bool, scale: torch.Tensor) -> LSQQuantizer:
    q = LSQQuantizer(bits, signed=signed, channels=len(scale), narrow=narrow)
    with torch.no_grad():
        q.scale.copy_(scale)
    q.initialized.fill_(True)
    return q


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@settings(max_examples=200, deadline=None)
@given(case=quantizer_cases())
def test_quantize_dequantize_round_trip(kernel, case):
    if kernel == "fused" and library.load() != "extension":
        pytest.skip("the op library did not build here")
    bits, signed, narrow, scale, x = case
    q = _quantizer(bits, signed, narrow, scale)
    step = scale[:, None] if len(scale) > 1 else scale
    codes = q.quantize_int(x)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax

    if kernel == "fused":
        fake = q(x).detach()
    else:
        fake = fake_quant.reference_forward(x, q.scale.detach(), float(q.qmin), float(q.qmax), 1.0)
    assert torch.equal(fake, codes.float() * step)  # training's forward is dequantize(quantize(x))
    assert torch.equal(q.quantize_int(fake), codes)  # grid values quantize to themselves

    inside = (x >= q.qmin * step) & (x <= q.qmax * step)
    error = (fake - x).abs()
    assert bool((error[inside] <= (step / 2 * (1 + 1e-5)).expand_as(x)[inside]).all())  # rounding: half a step
    assert bool((codes[x > q.qmax * step] == q.qmax).all()) and bool((codes[x < q.qmin * step] == q.qmin).all())
