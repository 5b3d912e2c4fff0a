"""A trained qtool model on the kernels: same outputs as the model in PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.lowbit import runtime
from qtool.lowbit.bench_model import bench_checkpoint_model
from qtool.quant.binary import BinaryConv2d
from qtool.quant.prepare import prepare


def calibrated(model: nn.Module, bits: int, act_bits: int, x: torch.Tensor) -> nn.Module:
    q = prepare(model, bits=bits, act_bits=act_bits, first_last_bits=8)
    q(x)  # initialises the step sizes
    return q.eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1),
                         nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(24 * 8 * 8, 70), nn.ReLU(), nn.Linear(70, 40), nn.Linear(40, 10))


@pytest.mark.parametrize("bits,act_bits,packing", [(4, 4, "int4"), (3, 3, "int3"), (2, 4, "int3"), (4, 8, "int4")])
def test_quantized_model_matches_pytorch(qops, bits, act_bits, packing):
    x = torch.randn(6, 3, 16, 16)
    model = calibrated(small_cnn(), bits, act_bits, x)
    conversion = runtime.convert(model)
    # first and last layers stay 8-bit (the prepare default), everything else runs packed
    assert set(conversion.converted.values()) == {packing} and len(conversion.converted) == 4
    assert set(conversion.kept) == {"0", "11"}
    with torch.no_grad():
        expected, out = model(x), conversion.model(x)
    # Integer arithmetic instead of float sums of fake-quantized values: rounding-level drift.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_unsigned_8bit_activations_take_the_fp32_path(qops):
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 4 * 4, 5)), 4, 8, x)
    quantizer = runtime.input_quantizers(model)["2"]
    assert quantizer.qmax == 255  # after a ReLU: unsigned 8-bit codes
    conv = model.get_submodule("2")
    layer = runtime.PackedConv2d(conv, 4, quantizer)
    assert not layer.int8_activations
    with torch.no_grad():
        inp = quantizer(torch.relu(model.get_submodule("0")(model.qtool_act.input_1(x), input_step=model.qtool_act.input_1.scale)))
        torch.testing.assert_close(layer(inp), conv(inp, input_step=quantizer.scale), rtol=1e-4, atol=1e-5)


def test_uncalibrated_layers_are_refused(qops):
    model = prepare(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), bits=4, first_last_bits=8)
    with pytest.raises(ValueError, match="not initialised"):
        runtime.convert(model)


class LocalBinaryConv(nn.Conv2d):
    """A binary layer written elsewhere: per-channel scales, its own attribute names."""

    def forward(self, x):
        alpha = self.weight.abs().mean(dim=(1, 2, 3))
        w = torch.where(self.weight >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
        return F.conv2d(torch.where(x >= 0, 1.0, -1.0), w, self.bias, self.stride, self.padding)


def binary_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                         LocalBinaryConv(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                         BinaryConv2d(32, 32, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_binary_layers_run_through_adapters(qops):
    runtime.register_binary_adapter(LocalBinaryConv, lambda m: runtime.BinaryConvSpec(
        m.weight.detach(), m.weight.detach().abs().mean(dim=(1, 2, 3)), m.bias, m.stride, m.padding, m.dilation))
    try:
        model, x = binary_net(), torch.randn(3, 3, 12, 12)
        conversion = runtime.convert(model)
        assert conversion.converted == {"2": "binary", "4": "binary"}
        assert isinstance(conversion.model[2], runtime.KernelBinaryConv2d)
        with torch.no_grad():
            # one binary layer alone: the same up to where the scale multiplies
            h = model[1](model[0](x))
            torch.testing.assert_close(conversion.model[2](h), model[2](h), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(conversion.model(x), model(x), rtol=1e-4, atol=1e-4)
    finally:
        del runtime.BINARY_ADAPTERS[LocalBinaryConv]


def test_binary_linear_spec(qops):
    torch.manual_seed(2)
    weight, scale, bias = torch.randn(7, 100), torch.rand(7), torch.randn(7)
    layer = runtime.KernelBinaryLinear(runtime.BinaryLinearSpec(weight, scale, bias))
    x = torch.randn(5, 100)
    expected = torch.where(x >= 0, 1.0, -1.0) @ torch.where(weight >= 0, 1.0, -1.0).T * scale + bias
    torch.testing.assert_close(layer(x), expected)


def test_dequantized_is_the_plain_fp32_network(qops):
    model, x = binary_net(), torch.randn(2, 3, 12, 12)
    plain = runtime.dequantized(model)
    assert not any(isinstance(m, BinaryConv2d) for m in plain.modules())
    w = plain[4].weight
    assert torch.equal(w.abs(), torch.full_like(w, float(model[4].weight.detach().abs().mean())))
    with torch.no_grad():
        h = torch.randn(2, 32, 12, 12)
        torch.testing.assert_close(plain[4](h), F.conv2d(h, w, plain[4].bias, 2, 1))


def test_bench_checkpoint_model_reports_both_sides(qops):
    result = bench_checkpoint_model(binary_net(), torch.randn(2, 3, 12, 12), threads=[1], repeats=2)
    assert result["converted"] == {"4": "binary + bn"} and result["max_abs_diff"] < 1e-3  # BN in the epilogue
    row = result["results"][0]
    assert row["threads"] == 1 and row["kernels_ms"] > 0 and row["fp32_ms"] > 0


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 1), (1, 2), (2, 0), (1, 1)), ((3, 3), (2, 1), (2, 2), (2, 2)),
])
def test_packed_conv_geometry_matches_the_quantized_conv(qops, kernel, stride, padding, dilation):
    """The channels-last patch gather (strides, padding, dilation, non-square kernels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 9)
    model = calibrated(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 12, kernel, stride, padding, dilation),
                                     nn.Conv2d(12, 4, 1)), 4, 4, x)
    layer, quantizer = model.get_submodule("1"), runtime.input_quantizers(model)["1"]
    packed = runtime.PackedConv2d(layer, 4, quantizer)
    with torch.no_grad():
        stem = model.qtool_act.input_1
        inp = quantizer(model.get_submodule("0")(stem(x), input_step=stem.scale))
        expected = layer(inp, input_step=quantizer.scale)
        torch.testing.assert_close(packed(inp), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
