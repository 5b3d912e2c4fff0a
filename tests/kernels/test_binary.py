"""Binary GEMM and convolution: exact integers, equal to F.conv2d on the +-1 tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtool.lowbit import reference as ref


def signs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


# Fewer than 8 rows read the weights row by row; the others go through weight panels.
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 8, 64), (2, 9, 65), (7, 16, 144), (1, 5, 4100), (13, 17, 577),
                                   (50, 33, 130), (8, 9, 1023), (97, 40, 1000), (20, 24, 1024), (9, 3, 1601)])
def test_binary_gemm_is_exact(isa, M, N, K):
    g = torch.Generator().manual_seed(M * K)
    a, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    scale = torch.rand(N, generator=g)
    a_bits, w_bits = torch.ops.qtool.pack_binary(a), torch.ops.qtool.pack_binary(w)
    dot = signs(a).double() @ signs(w).double().T
    assert torch.equal(torch.ops.qtool.binary_gemm(a_bits, w_bits, K), dot.float())
    assert torch.equal(torch.ops.qtool.binary_gemm(a_bits, w_bits, K, scale), dot.float() * scale)
    one = torch.tensor([0.25])
    assert torch.equal(torch.ops.qtool.binary_gemm(a_bits, w_bits, K, one), dot.float() * 0.25)


@pytest.mark.parametrize("M,K", [(3, 70), (20, 70), (20, 1090)])
def test_binary_gemm_ignores_bits_past_k(isa, M, K):
    # Garbage in the unused high bits of the last word must not count (row and panel paths).
    a = torch.ops.qtool.pack_binary(torch.randn(M, K))
    w = torch.ops.qtool.pack_binary(torch.randn(5, K))
    dirty_a, dirty_w = a.clone(), w.clone()
    dirty_a[:, -1] |= -(1 << 20)
    dirty_w[:, -1] ^= 1 << 40
    assert torch.equal(torch.ops.qtool.binary_gemm(dirty_a, dirty_w, K), torch.ops.qtool.binary_gemm(a, w, K))


# (N, C, H, W, O, kernel, stride, padding, dilation)
CONVS = [
    (2, 16, 9, 7, 10, 3, 1, 1, 1),    # resnet20-like, odd spatial size
    (1, 3, 8, 8, 5, 3, 2, 1, 1),      # C=3 fields straddle words
    (1, 64, 5, 6, 8, 3, 1, 1, 1),     # word-aligned channels
    (2, 70, 6, 5, 17, 3, 2, 2, 2),    # channels past one word, dilation, stride
    (1, 128, 4, 4, 9, 1, 1, 0, 1),    # 1x1
    (1, 5, 7, 7, 3, 5, 1, 3, 1),      # padding wider than half the kernel
    (1, 32, 4, 4, 24, (3, 1), 1, (2, 0), 1),  # non-square kernel and padding
    (3, 130, 3, 3, 8, 3, 1, 1, 1),    # C = 2 words + 2 bits
    # byte-aligned channel counts (dense bit streams), the compiled-in 3x3 ones and others
    (2, 8, 6, 6, 9, 3, 2, 1, 1),
    (1, 24, 5, 5, 7, 3, 1, 1, 1),
    (2, 32, 6, 7, 12, 3, 1, 1, 1),
    (2, 48, 5, 4, 10, 3, 2, 1, 1),
    (1, 72, 5, 5, 6, 3, 1, 1, 1),
    (1, 16, 6, 6, 5, 5, 1, 2, (2, 1)),
    (1, 40, 4, 6, 3, 2, 2, 0, 1),
]


@pytest.mark.parametrize("N,C,H,W,O,k,s,p,d", CONVS)
def test_binary_conv2d_equals_conv_on_signs(isa, N, C, H, W, O, k, s, p, d):
    g = torch.Generator().manual_seed(C * H + O)
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    x = torch.randn(N, C, H, W, generator=g)
    x[:, :, 0, 0] = 0.0  # sign(0) = +1
    weight = torch.randn(O, C, *pair(k), generator=g)
    w_bits = torch.ops.qtool.pack_binary(ref.binary_weight_order(weight).contiguous())
    scale = torch.rand(O, generator=g)
    expected = F.conv2d(signs(x).double(), signs(weight).double(), stride=pair(s), padding=pair(p),
                        dilation=pair(d)).float()
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = torch.ops.qtool.binary_conv2d(inp, w_bits, C, pair(k), pair(s), pair(p), pair(d))
        assert torch.equal(out, expected)
    scaled = torch.ops.qtool.binary_conv2d(x, w_bits, C, pair(k), pair(s), pair(p), pair(d), scale)
    assert torch.equal(scaled, expected * scale.view(1, -1, 1, 1))
    assert scaled.is_contiguous(memory_format=torch.channels_last)


def test_binary_conv2d_checks_geometry(qops):
    x = torch.randn(1, 4, 5, 5)
    w = torch.ops.qtool.pack_binary(torch.randn(2, 36))
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.qtool.binary_conv2d(x, w, 5, [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="words per row"):
        torch.ops.qtool.binary_conv2d(x, w, 4, [5, 5], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.qtool.binary_conv2d(torch.randn(1, 4, 2, 2), w, 4, [3, 3], [1, 1], [0, 0], [1, 1])
