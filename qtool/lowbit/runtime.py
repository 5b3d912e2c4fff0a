"""Run a trained qtool model on the packed kernels.

``convert(model)`` returns a copy for inference in which

- ``QuantLinear`` / ``QuantConv2d`` with weights of at most 4 bits become ``PackedLinear`` /
  ``PackedConv2d``: integer weight codes packed 4-bit (3-bit codes and narrower use the 3-bit
  packing), activations quantized by the layer's own input quantizer to int8 codes, products
  summed exactly in integers (``lowbit_gemm_i8``); activations whose codes do not fit int8
  (8-bit unsigned) take the fp32 path (``lowbit_gemm``). Same function as the fake-quantized
  layer, computed in integers instead of floats.
- binary layers become ``KernelBinaryConv2d`` / ``KernelBinaryLinear`` (XNOR-popcount). A
  binary layer is recognised through an *adapter*: a function that reads the module and
  returns a ``BinaryConvSpec`` / ``BinaryLinearSpec`` (weights whose signs are the binary
  weights, the output scale, bias and geometry), or None when it cannot run on the kernels.
  ``register_binary_adapter(cls, adapter)`` adds one; qtool's ``BinaryConv2d`` (``--bits 1``)
  has its own registered here.
- every other module (8-bit first/last layers, BatchNorm, ReLU, pooling) stays as it is.

``dequantized(model)`` is the same network in plain fp32 (quantizers and sign functions
removed, weights replaced by their dequantized values): the "fp32 model" the benchmarks
compare against. Conversion only: the benchmarks that time the result are
``qtool.lowbit.bench_model`` (whole models) and ``qtool.lowbit.bench`` (single kernels).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtool.errors import InputError
from qtool.lowbit import ops
from qtool.quant.binary import BinaryConv2d
from qtool.quant.graph import GRAPH_KWARGS
from qtool.quant.integer import folded_affine, integer_layer
from qtool.quant.layers import QuantConv2d, QuantizedLayer
from qtool.quant.lsq import LSQQuantizer


# --------------------------------------------------------------------------- binary adapters
@dataclass
class BinaryConvSpec:
    """y = conv2d(sign(x), sign(weight), zero padding) * scale + bias, sign(0) = +1."""

    weight: torch.Tensor  # [O, C, kh, kw]; only the signs matter
    scale: torch.Tensor  # [O] or [1]
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass
class BinaryLinearSpec:
    """y = sign(x) @ sign(weight).T * scale + bias, sign(0) = +1."""

    weight: torch.Tensor  # [O, K]
    scale: torch.Tensor  # [O] or [1]
    bias: torch.Tensor | None


Adapter = Callable[[nn.Module], "BinaryConvSpec | BinaryLinearSpec | None"]
BINARY_ADAPTERS: dict[type, Adapter] = {}


def register_binary_adapter(cls: type, adapter: Adapter) -> None:
    """Teach ``convert`` a binary layer class (exact class match, so subclasses opt in)."""
    BINARY_ADAPTERS[cls] = adapter


def _qtool_binary_spec(m: BinaryConv2d) -> BinaryConvSpec | None:
    """qtool's trained binary conv (``--bits 1``): same semantics, per-layer or per-channel scale."""
    if m.groups != 1:
        return None
    return BinaryConvSpec(m.binary_weight().float(), m.weight_scale(), m.bias, m.stride, m.padding, m.dilation)


register_binary_adapter(BinaryConv2d, _qtool_binary_spec)


# ------------------------------------------------------------------------- kernel modules
class KernelBinaryConv2d(nn.Module):
    def __init__(self, spec: BinaryConvSpec):
        super().__init__()
        out_channels, self.in_channels, kh, kw = spec.weight.shape
        self.kernel_size, self.stride = [kh, kw], list(spec.stride)
        self.padding, self.dilation = list(spec.padding), list(spec.dilation)
        self.register_buffer("weight_bits", ops.pack_conv_weight_binary(spec.weight.detach().float()))
        self.register_buffer("scale", spec.scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if spec.bias is None else spec.bias.detach().float().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qtool.binary_conv2d(x, self.weight_bits, self.in_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.scale)
        return y if self.bias is None else y + self.bias


class KernelBinaryLinear(nn.Module):
    def __init__(self, spec: BinaryLinearSpec):
        super().__init__()
        self.in_features = spec.weight.shape[1]
        self.register_buffer("weight_bits", torch.ops.qtool.pack_binary(spec.weight.detach().float().contiguous()))
        self.register_buffer("scale", spec.scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if spec.bias is None else spec.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qtool.binary_gemm(torch.ops.qtool.pack_binary(x.float()), self.weight_bits, self.in_features,
                                        self.scale)
        return y if self.bias is None else y + self.bias


def _packed_bits(layer: QuantizedLayer) -> int | None:
    """The packing (4 or 3) for the layer's weight codes, or None when they do not fit."""
    q = layer.weight_quantizer
    if q.qmin >= -4 and q.qmax <= 3:
        return 3
    if q.qmin >= -8 and q.qmax <= 7:
        return 4
    return None


class _PackedLayer(nn.Module):
    """Packed weights and the input quantizer's step of one quantized layer, from the layer's
    integer view (``qtool.quant.integer``): folded batch norm and, for a graph-prepared layer,
    the trained int32 bias included."""

    def __init__(self, layer: QuantizedLayer, bits: int, input_quantizer: LSQQuantizer):
        super().__init__()
        wq, aq = layer.weight_quantizer, input_quantizer
        if not (bool(wq.initialized) and bool(aq.initialized)):
            raise InputError("the layer's quantizers are not initialised: run a batch through the model first")
        self.bits = bits
        graph_prepared = layer.input_quantizer is None
        view = integer_layer(layer, aq.scale if graph_prepared else None)
        self.in_features = view.codes[0].numel()
        self.register_buffer("weight_packed", ops.pack_weights(self.weight_rows(view.codes), bits))
        self.register_buffer("weight_scale", view.weight_step.float().reshape(-1, 1).contiguous())
        bias = None
        if view.bias_codes is not None:
            bias = (view.bias_codes.double() * view.unit.double()).float()
        elif view.bias is not None:
            bias = view.bias.float()
        self.register_buffer("bias", bias)
        self.register_buffer("act_step", aq.scale.detach().float().reshape(()))
        self.act_qmin, self.act_qmax = aq.qmin, aq.qmax
        self.int8_activations = -128 <= aq.qmin and aq.qmax <= 127

    def weight_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Weight codes as [out, in] rows, in the order ``matmul``'s input rows use."""
        return codes.reshape(codes.shape[0], -1)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input quantizer's integer codes, as floats (exact): what LSQ's forward rounds to."""
        return torch.clamp(x / self.act_step, self.act_qmin, self.act_qmax).round()

    def matmul(self, x: torch.Tensor, quantized: bool = False) -> torch.Tensor:
        """Rows [M, K] (or their codes, ``quantized``) through the layer's quantizer and weights,
        plus bias: [M, N]."""
        codes = x if quantized else self.codes(x)
        K, group = self.in_features, self.in_features
        if self.int8_activations:
            steps = self.act_step.expand(codes.shape[0]).contiguous()
            y = torch.ops.qtool.lowbit_gemm_i8(codes.to(torch.int8), steps, self.weight_packed, self.weight_scale,
                                               self.bits, K, group)
        else:
            y = torch.ops.qtool.lowbit_gemm(codes * self.act_step, self.weight_packed, self.weight_scale, self.bits,
                                            K, group)
        return y if self.bias is None else y + self.bias


class PackedLinear(_PackedLayer):
    def forward(self, x: torch.Tensor, input_step: torch.Tensor | None = None,
                output_step: torch.Tensor | None = None, output_ready: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        return self.matmul(rows).reshape(*x.shape[:-1], -1)


class PackedConv2d(_PackedLayer):
    def __init__(self, layer: QuantConv2d, bits: int, input_quantizer: LSQQuantizer):
        super().__init__(layer, bits, input_quantizer)
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    def weight_rows(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.permute(0, 2, 3, 1).reshape(codes.shape[0], -1)  # (kh, kw, C): channels-last patches

    def forward(self, x: torch.Tensor, input_step: torch.Tensor | None = None,
                output_step: torch.Tensor | None = None, output_ready: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        # Quantize once per pixel, then gather the patches from the (int8) codes in channels-last
        # order with one strided copy: zero padding is code 0, the quantizer's zero.
        codes = self.codes(x.float())
        codes = codes.to(torch.int8) if self.int8_activations else codes
        padded = F.pad(codes.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()  # [N, H+2p, W+2p, C]
        sn, sy, sx, sc = padded.stride()
        patches = padded.as_strided((n, oh, ow, kh, kw, padded.shape[3]), (sn, sy * sh, sx * sw, sy * dh, sx * dw, sc))
        y = self.matmul(patches.reshape(n * oh * ow, -1), quantized=True)
        return y.view(n, oh, ow, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- conversion
@dataclass
class Conversion:
    model: nn.Module
    converted: dict[str, str]  # layer name -> kernel ("int4", "int3", "binary")
    kept: dict[str, str]  # quantized layer name -> why it stays in PyTorch


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def input_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Quantized layer name -> the quantizer of its input: its own (layer swap), or the tensor
    quantizer whose step the traced graph passes it (graph placement)."""
    found = {name: m.input_quantizer for name, m in model.named_modules()
             if isinstance(m, QuantizedLayer) and m.input_quantizer is not None}
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            step = node.kwargs.get("input_step") if node.op == "call_module" else None
            if isinstance(step, fx.Node) and step.op == "get_attr":
                found[node.target] = model.get_submodule(step.target.rpartition(".")[0])
    return found


def convert(model: nn.Module) -> Conversion:
    """A copy of ``model`` (in eval mode) whose low-bit layers run on the kernels."""
    model = copy.deepcopy(model).eval()
    converted, kept = {}, {}
    quantizers = input_quantizers(model)
    for name, module in list(model.named_modules()):
        adapter = BINARY_ADAPTERS.get(type(module))
        if adapter is not None:
            spec = adapter(module)
            if spec is None:
                kept[name] = "binary layer the kernels cannot run (groups, padding mode)"
            else:
                kernel = KernelBinaryConv2d(spec) if isinstance(spec, BinaryConvSpec) else KernelBinaryLinear(spec)
                _replace(model, name, kernel)
                converted[name] = "binary"
        elif isinstance(module, QuantizedLayer):
            bits = _packed_bits(module)
            if bits is None:
                kept[name] = f"{module.bits}-bit weights (kernels take at most 4)"
            elif name not in quantizers:
                kept[name] = "weight-only quantized layer (its input has no quantizer)"
            elif isinstance(module, QuantConv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                      or isinstance(module.padding, str)):
                kept[name] = "grouped or non-zero-padded convolution"
            else:
                packed_type = PackedConv2d if isinstance(module, QuantConv2d) else PackedLinear
                _replace(model, name, packed_type(module, bits, quantizers[name]))
                converted[name] = f"int{bits}"
    return Conversion(model, converted, kept)


def dequantized(model: nn.Module, float_weights: bool = False) -> nn.Module:
    """The same network in plain fp32: quantized and binary layers become nn.Conv2d/nn.Linear
    holding their dequantized weights (``float_weights``: the float weights they quantize; batch
    norm folded in either way), with no activation quantization or sign."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):  # plain layers take no steps, adds sum floats
        for node in model.graph.nodes:
            if node.op == "call_module" and set(node.kwargs) & set(GRAPH_KWARGS):
                node.kwargs = {k: v for k, v in node.kwargs.items() if k not in GRAPH_KWARGS}
        model.graph.eliminate_dead_code()
        model.recompile()
    for name, module in list(model.named_modules()):
        adapter = BINARY_ADAPTERS.get(type(module))
        spec = adapter(module) if adapter is not None else None
        if spec is not None:
            weight = torch.where(spec.weight >= 0, 1.0, -1.0) * spec.scale.reshape(-1, *[1] * (spec.weight.dim() - 1))
            plain = _plain_like(module, weight, spec.bias)
        elif isinstance(module, QuantizedLayer):
            view = integer_layer(module)
            if float_weights:
                mul, _ = folded_affine(module)
                scale = 1.0 if mul is None else mul.reshape(-1, *[1] * (module.weight.dim() - 1))
                weight = (module.weight.detach().double() * scale).float()
            else:
                weight = (view.codes * view.weight_step.reshape(-1, *[1] * (view.codes.dim() - 1))).float()
            plain = _plain_like(module, weight, None if view.bias is None else view.bias.float())
        elif isinstance(module, LSQQuantizer) and isinstance(model, fx.GraphModule):
            plain = nn.Identity()  # a graph-placed tensor quantizer
        else:
            continue
        _replace(model, name, plain)
    return model


def _plain_like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.groups, bias is not None, module.padding_mode)
    else:
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain.eval()


__all__ = ["BinaryConvSpec", "BinaryLinearSpec", "Conversion", "KernelBinaryConv2d", "KernelBinaryLinear",
           "PackedConv2d", "PackedLinear", "convert", "dequantized", "register_binary_adapter"]
