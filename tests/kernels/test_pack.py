"""Packing: the C++ layouts equal the reference's byte for byte, and unpacking inverts packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_testing import runnable_isas, using_isa
from qtool.lowbit import reference as ref

shapes = st.tuples(st.integers(0, 6), st.integers(0, 200))


def random_codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from([3, 4]), seed=st.integers(0, 2**16))
def test_int_pack_round_trip(qops, shape, bits, seed):
    codes = random_codes(shape, bits, seed)
    pack = torch.ops.qtool.pack_int4 if bits == 4 else torch.ops.qtool.pack_int3
    unpack = torch.ops.qtool.unpack_int4 if bits == 4 else torch.ops.qtool.unpack_int3
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 64) * (32 if bits == 4 else 24))
    assert torch.equal(packed, (ref.pack_int4 if bits == 4 else ref.pack_int3)(codes))
    assert torch.equal(unpack(packed, shape[1]), codes.to(torch.int8))
    assert torch.equal((ref.unpack_int4 if bits == 4 else ref.unpack_int3)(packed, shape[1]), codes.to(torch.int8))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), zeros=st.booleans())
def test_binary_pack_round_trip_on_every_isa(qops, shape, seed, zeros):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if zeros:
        x[:, ::3] = 0.0  # sign(0) = +1
    expected = ref.pack_binary(x)
    for name in runnable_isas(qops):
        with using_isa(qops, name):
            bits = torch.ops.qtool.pack_binary(x)
        assert torch.equal(bits, expected), name
    signs = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(torch.ops.qtool.unpack_binary(expected, shape[1]), signs)
    assert torch.equal(ref.unpack_binary(expected, shape[1]), signs)


def test_int4_layout_is_documented_one(qops):
    # byte j of a block: code j + 8 in the low nibble, code j + 32 + 8 in the high nibble.
    codes = torch.arange(64).remainder(16).sub(8).reshape(1, 64)
    packed = torch.ops.qtool.pack_int4(codes)[0]
    assert packed[0] == (0 | (0 << 4)) and packed[1] == (1 | (1 << 4)) and packed[15] == 15 | (15 << 4)


def test_int3_layout_is_documented_one(qops):
    codes = torch.full((1, 64), -4)
    codes[0, 17] = 3  # u = 7: low bits 3 in byte 1 at bits 2..3, high bit 17 of the word
    packed = torch.ops.qtool.pack_int3(codes)[0]
    assert packed[1] == 3 << 2 and int.from_bytes(bytes(packed[16:24].tolist()), "little") == 1 << 17


def test_binary_high_bit_and_tail(qops):
    x = -torch.ones(2, 70)
    x[0, 63] = 1.0
    x[1, 69] = 0.0
    bits = torch.ops.qtool.pack_binary(x)
    assert bits[0, 0] == -(2**63) and bits[0, 1] == 0
    assert bits[1, 0] == 0 and bits[1, 1] == 1 << 5


@pytest.mark.parametrize("bits", [3, 4])
def test_codes_out_of_range_are_rejected(qops, bits):
    pack = torch.ops.qtool.pack_int4 if bits == 4 else torch.ops.qtool.pack_int3
    with pytest.raises(RuntimeError, match="must lie in"):
        pack(torch.tensor([[2 ** (bits - 1)]]))
    with pytest.raises(RuntimeError, match="integer"):
        pack(torch.zeros(1, 4))


def test_unpack_checks_the_row_length(qops):
    with pytest.raises(RuntimeError, match="take 32 bytes"):
        torch.ops.qtool.unpack_int4(torch.zeros(1, 16, dtype=torch.uint8), 64)
    with pytest.raises(RuntimeError, match="words per row"):
        torch.ops.qtool.unpack_binary(torch.zeros(1, 1, dtype=torch.int64), 65)
