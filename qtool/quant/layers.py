"""Conv2d and Linear layers whose weights (and, in the layer-swap form, inputs) pass through LSQ
quantizers.

They subclass the torch layers, so a state dict keeps the usual ``weight``/``bias`` names and a
quantized model loads into code that expects the float layer plus the quantizer entries.

Two forms:
- *graph-prepared* (``qtool.quant.graph``, the default): no input quantizer (the tensor
  quantizer of whatever produced the input already put it on its grid), the batch norm that
  followed the layer folded in as ``bn``, and the input's step passed to ``forward``. In eval
  mode the layer then computes what the deployed integer kernel computes
  (``qtool.quant.integer.deployed_output``): batch norm folded, bias rounded to int32
  accumulator units.
- *layer swap* (``input_quantizer`` set): the layer quantizes its own input; the fallback for
  models torch.fx cannot trace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.quant.integer import deployed_output
from qtool.quant.lsq import LSQQuantizer


class QuantizedLayer:
    """Mixin: a layer with ``weight_quantizer`` (per output channel), optionally an
    ``input_quantizer`` and a folded batch norm ``bn``."""

    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer | None
    bn: nn.Module | None

    def _attach_quantizers(self, bits: int, act_bits: int | None, out_channels: int, narrow: bool) -> None:
        self.weight_quantizer = LSQQuantizer(bits, signed=True, channels=out_channels, narrow=narrow, weight=True)
        self.input_quantizer = None if act_bits is None else LSQQuantizer(act_bits, signed=None)
        self.bn = None

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def deploys(self, input_step: torch.Tensor | None) -> bool:
        """Eval mode with the input's step known: compute what the integer kernel computes."""
        return not self.training and input_step is not None

    @staticmethod
    def _ready(output_step: torch.Tensor | None, ready: torch.Tensor | None) -> torch.Tensor | None:
        """The next quantizer's step, once it has one (a model evaluated before training has not)."""
        return output_step if output_step is not None and ready is not None and bool(ready) else None

    def _float_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bn is None else self.bn(y)

    def fold_batchnorm(self, bn: nn.Module) -> None:
        if bn.num_features != self.weight.shape[0]:
            raise ValueError(f"batch norm over {bn.num_features} channels cannot fold into {self.weight.shape[0]}")
        self.bn = bn


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    def __init__(self, *args, bits: int = 4, act_bits: int | None = 4, narrow: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_quantizers(bits, act_bits, self.out_channels, narrow)

    def forward(self, x: torch.Tensor, input_step: torch.Tensor | None = None,
                output_step: torch.Tensor | None = None, output_ready: torch.Tensor | None = None) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.deploys(input_step):
            return deployed_output(self, x, input_step, lambda codes, w: self._conv_forward(codes, w, None),
                                   self._ready(output_step, output_ready))
        return self._float_output(self._conv_forward(x, self.quantized_weight(), self.bias))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, act_bits: int | None, narrow: bool = True) -> "QuantConv2d":
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
    def __init__(self, *args, bits: int = 4, act_bits: int | None = 4, narrow: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_quantizers(bits, act_bits, self.out_features, narrow)

    def forward(self, x: torch.Tensor, input_step: torch.Tensor | None = None,
                output_step: torch.Tensor | None = None, output_ready: torch.Tensor | None = None) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.deploys(input_step):
            return deployed_output(self, x, input_step, F.linear, self._ready(output_step, output_ready))
        return self._float_output(F.linear(x, self.quantized_weight(), self.bias))

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, act_bits: int | None, narrow: bool = True) -> "QuantLinear":
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            bits=bits, act_bits=act_bits, narrow=narrow,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict(), strict=False)
        return layer
