"""Binary convs with their block's epilogue in one op (``binary_conv2d_fused``), and the fusion
pass that builds them (``qtool.lowbit.binary_fused``): equal to the unfused computation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.lowbit import reference as ref


def _inputs(N=2, C=20, H=7, W=6, O=24, stride=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = ref.pack_binary(ref.binary_weight_order(torch.randn(O, C, 3, 3, generator=g)).contiguous())
    OH, OW = (H + 2 - 3) // stride + 1, (W + 2 - 3) // stride + 1
    vectors = [torch.randn(O, generator=g) for _ in range(3)]
    residual = torch.randn(N, O, OH, OW, generator=g)
    return x, w, C, stride, torch.rand(O, generator=g), vectors, residual


@pytest.mark.parametrize("bias,relu_first,bn,residual,relu_last", list(itertools.product([False, True], repeat=5)))
def test_epilogue_matches_the_reference_in_every_combination(isa, bias, relu_first, bn, residual, relu_last):
    x, w, C, stride, scale, (b, a, shift), res = _inputs(seed=bias + 2 * relu_first + 4 * bn)
    args = (x, w, C, [3, 3], [stride, stride], [1, 1], [1, 1], scale, b if bias else None, relu_first,
            a if bn else None, shift if bn else None, res if residual else None, relu_last)
    out = torch.ops.qtool.binary_conv2d_fused(*args)
    expected = ref.binary_conv2d_fused(*args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    # and the reference is binary_conv2d followed by the same PyTorch ops
    y = ref.binary_conv2d(x, w, C, [3, 3], [stride] * 2, [1, 1], [1, 1], scale)
    y = y + b.reshape(1, -1, 1, 1) if bias else y
    y = torch.relu(y) if relu_first else y
    y = y * a.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1) if bn else y
    y = y + res if residual else y
    y = torch.relu(y) if relu_last else y
    assert torch.equal(expected, y)


def test_residual_in_any_layout_and_a_clear_error_for_the_wrong_shape(qops):
    x, w, C, stride, scale, (_, a, shift), res = _inputs(stride=2)
    call = lambda r: torch.ops.qtool.binary_conv2d_fused(  # noqa: E731
        x, w, C, [3, 3], [2, 2], [1, 1], [1, 1], scale, None, True, a, shift, r, False)
    torch.testing.assert_close(call(res), call(res.contiguous(memory_format=torch.channels_last)), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="residual must be"):
        call(torch.randn(2, 24, 7, 6))
    with pytest.raises(RuntimeError, match="post_scale and post_shift"):
        torch.ops.qtool.binary_conv2d_fused(x, w, C, [3, 3], [2, 2], [1, 1], [1, 1], scale, None, True, a, None,
                                            None, False)


def _bireal_resnet20():
    from qtool.models import resnet20
    from qtool.quant.binarize import prepare_binary

    torch.manual_seed(0)
    model = prepare_binary(resnet20())
    with torch.no_grad():  # BN statistics that are not the identity
        model.train()
        model(torch.randn(64, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("which", ["bireal", "classic"])
def test_fused_model_equals_the_per_layer_kernels_and_the_trained_model(qops, which):
    from qtool.lowbit import runtime
    from qtool.lowbit.bench_model import binary_resnet20
    from qtool.lowbit.binary_fused import FusedBinaryConv2d
    from qtool.lowbit.fused import convert

    model = _bireal_resnet20() if which == "bireal" else binary_resnet20()
    conversion = convert(model)
    fused = [m for m in conversion.model.modules() if isinstance(m, FusedBinaryConv2d)]
    assert len(fused) == 18  # every binary conv of the 9 blocks took its epilogue
    expected = {"bireal": {"binary + relu, bn, add"},
                "classic": {"binary + bn, relu", "binary + bn, add, relu"}}[which]
    assert set(conversion.converted.values()) == expected
    per_layer = runtime.convert(model).model
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, unfused, trained = conversion.model(x), per_layer(x), model(x)
    scale = float(trained.abs().max())
    torch.testing.assert_close(out, unfused, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out, trained, rtol=0, atol=1e-5 * scale)
    assert torch.equal(out.argmax(1), trained.argmax(1))


def test_chains_the_epilogue_cannot_take_stay_in_pytorch(qops):
    """BN then ReLU then BN: the second BN is not fused; a conv output used twice is not fused."""
    from qtool.lowbit.binary_fused import fuse_binary
    from qtool.lowbit.runtime import convert
    from qtool.quant.binary import BinaryConv2d

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = BinaryConv2d(8, 8, 3, 1, 1, bias=True), BinaryConv2d(8, 8, 3, 1, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.bn2(F.relu(self.bn1(self.a(x))))  # conv -> bn -> relu fused; bn2 stays
            z = self.b(y)
            return z + z * 2  # z has two users: nothing to fuse

    model = Odd().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    conversion = fuse_binary(convert(model))
    assert conversion.converted == {"a": "binary + bn, relu", "b": "binary"}
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conversion.model(x), model(x), rtol=1e-5, atol=1e-4)


def test_a_broadcasting_add_still_computes_the_model(qops):
    """``conv(x) + bias_map`` with a [N, O, 1, 1] operand: the op takes no broadcast, the module
    falls back to adding in PyTorch (same result)."""
    from qtool.lowbit.binary_fused import fuse_binary
    from qtool.lowbit.runtime import convert
    from qtool.quant.binary import BinaryConv2d

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = BinaryConv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x.mean((2, 3), keepdim=True))

    model = Broadcast().eval()
    conversion = fuse_binary(convert(model))
    assert conversion.converted == {"conv": "binary + bn, add, relu"}
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conversion.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_in_place_residual_add_fuses_too(qops):
    """torchvision's blocks write ``out += identity``; fx records operator.iadd."""
    from qtool.lowbit.binary_fused import fuse_binary
    from qtool.lowbit.runtime import convert
    from qtool.quant.binary import BinaryConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = BinaryConv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x
            return torch.relu(out)

    model = Block().eval()
    model.bn.running_mean.uniform_(-1, 1)
    conversion = fuse_binary(convert(model))
    assert conversion.converted == {"conv": "binary + bn, add, relu"}
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conversion.model(x), model(x), rtol=1e-5, atol=1e-5)
