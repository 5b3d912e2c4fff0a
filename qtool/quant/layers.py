"""Conv2d and Linear layers whose weights and inputs pass through LSQ quantizers.

They subclass the torch layers, so a state dict keeps the usual ``weight``/``bias`` names and a
quantized model loads into code that expects the float layer plus the quantizer entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.quant.lsq import LSQQuantizer


class QuantizedLayer:
    """Mixin: a layer with ``weight_quantizer`` (per output channel) and ``input_quantizer``."""

    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer

    def _attach_quantizers(self, bits: int, act_bits: int, out_channels: int, narrow: bool) -> None:
        self.weight_quantizer = LSQQuantizer(bits, signed=True, channels=out_channels, narrow=narrow)
        self.input_quantizer = LSQQuantizer(act_bits, signed=None)

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int:
        return self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    def __init__(self, *args, bits: int = 4, act_bits: int = 4, narrow: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_quantizers(bits, act_bits, self.out_channels, narrow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, act_bits: int, narrow: bool = True) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, bits=bits, act_bits=act_bits, narrow=narrow,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer.load_state_dict(conv.state_dict(), strict=False)
        return layer


class QuantLinear(QuantizedLayer, nn.Linear):
    def __init__(self, *args, bits: int = 4, act_bits: int = 4, narrow: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_quantizers(bits, act_bits, self.out_features, narrow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, act_bits: int, narrow: bool = True) -> "QuantLinear":
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            bits=bits, act_bits=act_bits, narrow=narrow,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict(), strict=False)
        return layer
