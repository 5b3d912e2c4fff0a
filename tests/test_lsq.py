"""LSQ quantizer: the grid, the forward values, the LSQ step-size gradient, initialisation,
and the fused C++ kernel against the PyTorch reference."""

import math

import pytest
import torch

from qtool.native import library
from qtool.quant import fake_quant
from qtool.quant.lsq import LSQQuantizer, integer_range


@pytest.mark.parametrize("bits,signed,narrow,expected", [
    (4, True, False, (-8, 7)), (4, True, True, (-7, 7)), (4, False, False, (0, 15)),
    (3, True, True, (-3, 3)), (2, False, False, (0, 3)), (8, True, False, (-128, 127)),
])
def test_integer_range(bits, signed, narrow, expected):
    assert integer_range(bits, signed, narrow) == expected


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(ValueError, match="2 to 8 bits"):
        LSQQuantizer(bits, signed=True)


def test_forward_values_lie_on_the_grid():
    q = LSQQuantizer(4, signed=True, narrow=True)
    x = torch.randn(1000) * 3
    y = q(x)
    step = q.scale.item()
    codes = y / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -7 - 1e-4 and codes.max() <= 7 + 1e-4
    assert len(torch.unique(codes.round())) <= 15


def test_forward_matches_formula_exactly():
    q = LSQQuantizer(3, signed=False)
    q.initialized.fill_(True)
    q.scale.data.fill_(0.25)
    x = torch.tensor([-1.0, 0.0, 0.1, 0.13, 0.375, 0.625, 0.9, 1.74, 1.76, 10.0])
    # round(clamp(x / 0.25, 0, 7)) * 0.25; ties (1.5, 2.5) round half to even, like torch.round.
    expected = torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 0.5, 1.0, 1.75, 1.75, 1.75])
    assert torch.equal(q(x), expected)


def test_scale_gradient_matches_lsq_formula():
    """dy/ds = round(x/s) - x/s inside the range, qmin/qmax outside, times 1/sqrt(N * qmax)."""
    q = LSQQuantizer(2, signed=True)  # grid [-2, 1]
    q.initialized.fill_(True)
    q.scale.data.fill_(0.5)
    x = torch.tensor([0.3, -0.7, 0.45, 5.0, -5.0, 0.1])
    q(x).sum().backward()
    v = x / 0.5
    inside = (v >= -2) & (v <= 1)
    per_element = torch.where(inside, v.round() - v, v.clamp(-2, 1))
    expected = per_element.sum() / math.sqrt(x.numel() * 1)
    assert q.scale.grad.item() == pytest.approx(expected.item(), rel=1e-6)


def test_input_gradient_is_straight_through_inside_and_zero_outside():
    q = LSQQuantizer(4, signed=False)
    q.initialized.fill_(True)
    q.scale.data.fill_(0.1)
    x = torch.tensor([-0.5, 0.0, 0.73, 1.5, 1.6], requires_grad=True)  # grid [0, 1.5]
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_per_channel_gradient_scale_uses_elements_per_channel():
    q = LSQQuantizer(4, signed=True, channels=3, narrow=True)
    w = torch.randn(3, 2, 3, 3)
    q(w)  # initialise
    q.scale.grad = None
    q(w).sum().backward()
    s = q.scale.detach().reshape(3, 1, 1, 1)
    v = w / s
    inside = (v >= -7) & (v <= 7)
    per_element = torch.where(inside, v.round() - v, v.clamp(-7, 7))
    expected = per_element.sum(dim=(1, 2, 3)) / math.sqrt(18 * 7)
    assert torch.allclose(q.scale.grad, expected, rtol=1e-5)


def test_activation_sign_is_decided_by_the_first_batch():
    relu_out = LSQQuantizer(4, signed=None)
    relu_out(torch.rand(8, 4))
    assert not relu_out.signed and (relu_out.qmin, relu_out.qmax) == (0, 15)
    signed = LSQQuantizer(4, signed=None)
    signed(torch.randn(8, 4))
    assert signed.signed and (signed.qmin, signed.qmax) == (-8, 7)


@pytest.mark.parametrize("init", ["lsq", "mse"])
def test_initialisation(init):
    torch.manual_seed(0)
    w = torch.randn(4, 16, 3, 3)
    q = LSQQuantizer(4, signed=True, channels=4, narrow=True, init=init)
    q(w)
    if init == "lsq":
        expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
        assert torch.allclose(q.scale.detach(), expected)
    else:  # the MSE step beats the LSQ rule on a Gaussian at 4 bits
        lsq = LSQQuantizer(4, signed=True, channels=4, narrow=True, init="lsq")
        err = lambda quant: ((quant(w) - w) ** 2).mean().item()  # noqa: E731
        assert err(q) < err(lsq)


def test_quantize_int_gives_the_codes_of_the_forward():
    q = LSQQuantizer(3, signed=True, channels=2, narrow=True)
    w = torch.randn(2, 5)
    y = q(w)
    codes = q.quantize_int(w)
    assert codes.dtype == torch.int32
    assert torch.allclose(codes.float() * q.scale.detach()[:, None], y.detach())


requires_compiled = pytest.mark.skipif(library.load() != "extension", reason="the op library did not build here")


@requires_compiled
@pytest.mark.parametrize("shape,channels,grid,layout", [
    ((16, 8, 9, 9), 1, (0, 15), torch.contiguous_format),
    ((16, 8, 9, 9), 1, (-8, 7), torch.channels_last),
    ((32, 16, 3, 3), 32, (-7, 7), torch.contiguous_format),
    ((32, 16, 3, 3), 32, (-3, 3), torch.channels_last),
    ((10, 300), 10, (-127, 127), torch.contiguous_format),
])
def test_fused_kernel_matches_reference(shape, channels, grid, layout):
    torch.manual_seed(1)
    x = (torch.randn(*shape) * 2).contiguous(memory_format=layout) if len(shape) == 4 else torch.randn(*shape)
    scale = torch.rand(channels) * 0.2 + 0.05
    grad = torch.randn(*shape)
    xi, si = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y_fused = fake_quant.lsq_fake_quant(xi, si, grid[0], grid[1], 0.01)
    y_fused.backward(grad)
    qmin, qmax = map(float, grid)
    y_ref = fake_quant.reference_forward(x, scale, qmin, qmax, 0.01)
    gx_ref, gs_ref = fake_quant.reference_backward(grad, x, scale, qmin, qmax, 0.01)
    assert torch.equal(y_ref, y_fused.detach())  # same arithmetic, bit for bit
    assert torch.equal(gx_ref, xi.grad)
    assert torch.allclose(gs_ref, si.grad, rtol=1e-5, atol=1e-7)  # sums in another order
    assert y_fused.is_contiguous(memory_format=layout)


def test_reference_is_the_formula():
    x = torch.randn(4, 4)
    y = fake_quant.reference_forward(x, torch.tensor([0.5]), -8.0, 7.0, 1.0)
    assert torch.equal(y, torch.clamp(x / 0.5, -8, 7).round() * 0.5)


def test_gradient_scale_n_counts_one_sample_for_any_activation_quantizer():
    """An activation quantizer with a fixed sign (signed=False) used to count the whole batch
    (a batch-size-dependent step-size learning rate); weights count their elements."""
    for signed in (False, True, None):
        q = LSQQuantizer(4, signed=signed)
        assert q.elements_per_scale(torch.zeros(8, 3, 4, 4)) == q.elements_per_scale(torch.zeros(16, 3, 4, 4)) == 48
    assert LSQQuantizer(4, signed=True, weight=True).elements_per_scale(torch.zeros(5, 3)) == 15
    assert LSQQuantizer(4, signed=True, channels=5, weight=True).elements_per_scale(torch.zeros(5, 3)) == 3
