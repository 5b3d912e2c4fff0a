"""int4/int3 GEMMs and int8 row quantization against the reference, on every ISA build."""

from __future__ import annotations

import pytest
import torch

from lowbit_testing import assert_float_close
from qtool.lowbit import reference as ref

# (M, N, K): GEMV, tails of every tile size, K below, at and past whole 64-blocks.
SHAPES = [(1, 1, 1), (1, 37, 64), (1, 16, 100), (3, 5, 63), (4, 4, 128), (5, 9, 257), (9, 17, 200), (16, 33, 512)]


def weights(N, K, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g)
    return torch.ops.qtool.pack_int4(codes) if bits == 4 else torch.ops.qtool.pack_int3(codes)


def group_scales(N, K, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, -(-K // group_size), generator=g) + 0.05


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_activations_per_channel_is_bit_exact(isa, bits, M, N, K):
    w = weights(N, K, bits, seed=M * N + K)
    scale = group_scales(N, K, max(K, 1), seed=K)
    xq, xs = ref.quantize_rows_i8(torch.randn(M, K, generator=torch.Generator().manual_seed(K)))
    out = torch.ops.qtool.lowbit_gemm_i8(xq, xs, w, scale, bits, K, max(K, 1))
    assert torch.equal(out, ref.lowbit_gemm_i8(xq, xs, w, scale, bits, K, max(K, 1)))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("K,group_size", [(128, 64), (200, 64), (512, 128), (300, 128)])
def test_int8_activations_per_group(isa, bits, K, group_size):
    M, N = 6, 11
    w = weights(N, K, bits, seed=K)
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    # Unit scales: each group's integer dot product must come out exactly.
    ones = torch.ones(N, -(-K // group_size))
    exact = torch.ops.qtool.lowbit_gemm_i8(xq, torch.ones(M), w, ones, bits, K, group_size)
    assert torch.equal(exact, ref.lowbit_gemm_i8(xq, torch.ones(M), w, ones, bits, K, group_size))
    scale, xs = group_scales(N, K, group_size, seed=1), torch.rand(M) + 0.1
    out = torch.ops.qtool.lowbit_gemm_i8(xq, xs, w, scale, bits, K, group_size)
    assert_float_close(out, ref.lowbit_gemm_i8(xq, xs, w, scale, bits, K, group_size))


def test_int8_extremes_do_not_overflow(isa):
    # -128 activations against the largest unsigned codes: the AVX2 int16 pair sums must hold.
    K = 256
    xq = torch.full((2, K), -128, dtype=torch.int8)
    for bits in (3, 4):
        codes = torch.full((3, K), 2 ** (bits - 1) - 1)
        w = torch.ops.qtool.pack_int4(codes) if bits == 4 else torch.ops.qtool.pack_int3(codes)
        out = torch.ops.qtool.lowbit_gemm_i8(xq, torch.ones(2), w, torch.ones(3, 1), bits, K, K)
        assert torch.equal(out, torch.full((2, 3), float(-128 * (2 ** (bits - 1) - 1) * K)))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fp32_activations(isa, bits, M, N, K):
    w = weights(N, K, bits, seed=M + N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    for group_size in {max(K, 1), 64, 128}:
        scale = group_scales(N, K, group_size, seed=group_size)
        out = torch.ops.qtool.lowbit_gemm(x, w, scale, bits, K, group_size)
        assert_float_close(out, ref.lowbit_gemm(x, w, scale, bits, K, group_size))


def test_fp32_activations_with_unit_scale_and_integer_inputs_are_exact(isa):
    # Small integers keep every partial sum exact in float32, whatever the order.
    M, N, K = 5, 7, 300
    x = torch.randint(-3, 4, (M, K)).float()
    for bits in (3, 4):
        w = weights(N, K, bits, seed=bits)
        out = torch.ops.qtool.lowbit_gemm(x, w, torch.ones(N, 1), bits, K, K)
        assert torch.equal(out, ref.lowbit_gemm(x, w, torch.ones(N, 1), bits, K, K))


@pytest.mark.parametrize("M,K", [(1, 1), (3, 15), (4, 64), (5, 100), (2, 1000)])
def test_quantize_rows_i8_matches_reference(isa, M, K):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)) * 3
    x[0, 0] = 0.0
    if M > 2:
        x[2] = 0.0  # an all-zero row gets scale 1
    q, s = torch.ops.qtool.quantize_rows_i8(x)
    q_ref, s_ref = ref.quantize_rows_i8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_bad_arguments_are_rejected(qops):
    w = torch.ops.qtool.pack_int4(torch.zeros(4, 128, dtype=torch.int32))
    x = torch.zeros(2, 128)
    with pytest.raises(RuntimeError, match="bits must be 3 or 4"):
        torch.ops.qtool.lowbit_gemm(x, w, torch.ones(4, 1), 2, 128, 128)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.qtool.lowbit_gemm(x, w, torch.ones(4, 4), 4, 128, 32)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.qtool.lowbit_gemm(x, w, torch.ones(4, 3), 4, 128, 64)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.qtool.lowbit_gemm(x[:, :64], w, torch.ones(4, 1), 4, 128, 128)
