"""prepare(): quantized layers and tensor quantizers for any module, following a plan."""

import copy

import pytest
import torch
from torch import nn

from qtool.models import ZOO, build_model
from qtool.quant.layers import QuantConv2d, QuantLinear
from qtool.quant.prepare import prepare


class TinyNet(nn.Module):
    """Not from the zoo: depthwise conv, a residual add and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_prepare_swaps_layers_and_keeps_first_and_last_at_8_bits():
    model = TinyNet()
    q = prepare(model, bits=3, act_bits=4)
    assert isinstance(model.stem, nn.Conv2d) and not isinstance(model.stem, QuantConv2d)  # original untouched
    # graph placement: layers quantize weights; the tensor quantizer before them, their input
    assert isinstance(q.dw, QuantConv2d) and q.dw.bits == 3 and q.dw.input_quantizer is None
    # 8-bit edge layers store 7-bit weight codes (x86 without VNNI would saturate 8-bit ones)
    assert (q.stem.bits, q.head.bits) == (7, 7) and isinstance(q.head, QuantLinear)
    assert q.qtool_plan["pw"] == {"bits": 3, "act_bits": 4} and q.qtool_plan["stem"] == {"bits": 7, "act_bits": 8}
    assert torch.equal(q.dw.weight, model.dw.weight)


def test_first_last_float_and_exclusions():
    q = prepare(TinyNet(), bits=4, first_last_bits=None, exclude=["pw"])
    assert type(q.stem) is nn.Conv2d and type(q.head) is nn.Linear and type(q.pw) is nn.Conv2d
    assert isinstance(q.dw, QuantConv2d)


def test_8_bit_model_stays_close_to_float_and_4_bit_is_coarser():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(16, 3, 16, 16)
    reference = model(x)
    err = {}
    for bits in (8, 4):
        q = prepare(model, bits=bits).eval()
        err[bits] = (q(x) - reference).abs().max().item()
    assert err[8] < 0.02 * reference.abs().max().item()
    assert err[4] > err[8]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_prepares_and_backpropagates_into_scales(name):
    model = prepare(build_model(name, num_classes=4, in_channels=1), bits=4)
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    scales = [m.weight_quantizer.scale for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert out.shape == (2, 4) and scales and all(s.grad is not None for s in scales)


def test_state_dict_round_trip_restores_quantizer_decisions():
    q = prepare(TinyNet(), bits=4)
    x = torch.randn(4, 3, 16, 16)
    expected = q.eval()(x)
    fresh = prepare(TinyNet(), bits=4).eval()
    fresh.load_state_dict(copy.deepcopy(q.state_dict()))
    assert torch.equal(fresh(x), expected)
    signs = lambda m: [a.signed for a in m.qtool_act.children()]
    assert signs(fresh) == signs(q) and len(signs(q)) == 6  # input, 3 ReLU outputs, the sum, the mean
