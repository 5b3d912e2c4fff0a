"""Brevitas layers -> the same IR as qtool's, hence the same fused ONNX.

Brevitas puts activation quantizers on layer outputs (QuantReLU, QuantIdentity) or on a
layer's ``input_quant``/``output_quant``; weights carry their own quantizer. Each becomes an
explicit ``quant`` op, so a Brevitas model and a qtool model with the same quantizers export to
the same graph. Imported only when a model contains Brevitas modules.
"""

from __future__ import annotations

import torch
from brevitas import nn as qnn

from qtool.exporters.adapters import (
    Context, ExportError, float_array, module_adapter, per_channel, weighted_op,
)
from qtool.exporters.ir import Grid, Op, Weights


def _value(tensor) -> float:
    return float(torch.as_tensor(tensor).detach().reshape(-1)[0])


def _act_grid(proxy, layer: str) -> Grid:
    """The grid of a Brevitas activation quantizer (``act_quant``/``input_quant``/``output_quant``)."""
    if str(getattr(proxy, "rounding_mode", "ROUND")).upper() != "ROUND":
        raise ExportError(f"{layer}: Brevitas rounding mode {proxy.rounding_mode} has no ONNX QuantizeLinear equivalent")
    bits = int(_value(proxy.bit_width()))
    if bits > 8:
        raise ExportError(f"{layer}: {bits}-bit activations do not fit onnxruntime's 8-bit integer kernels")
    scale = torch.as_tensor(proxy.scale()).detach()
    if scale.numel() != 1:
        raise ExportError(f"{layer}: per-channel activation scales cannot be exported (onnxruntime needs per-tensor)")
    zero_point = int(round(_value(proxy.zero_point())))
    if proxy.is_signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi if proxy.is_narrow_range else -hi - 1
    else:
        lo, hi = 0, 2 ** bits - 1 - int(bool(proxy.is_narrow_range))
    # Brevitas stores the zero point on the unsigned grid as an offset of the codes.
    return Grid(_value(scale), zero_point, lo, hi)


def _weights(layer, name: str) -> Weights:
    quant = layer.quant_weight()
    if float(torch.as_tensor(quant.zero_point).abs().max()) != 0:
        raise ExportError(f"{name}: asymmetric weight quantization (nonzero zero point) cannot be exported")
    bits = int(_value(quant.bit_width))
    if bits > 8:
        raise ExportError(f"{name}: {bits}-bit weights do not fit int8")
    codes = quant.int().detach().to(torch.int32).numpy()
    scale = per_channel(float_array(torch.as_tensor(quant.scale).reshape(-1)), codes.shape[0])
    hi = 2 ** (bits - 1) - 1
    lo = -hi if layer.weight_quant.is_narrow_range else -hi - 1
    return Weights(codes, scale, lo, hi)


def _quant(proxy, ctx: Context, inputs: list[str], output: str) -> Op:
    return Op("quant", inputs, output, ctx.layer, {"grid": _act_grid(proxy, ctx.layer)})


@module_adapter(qnn.QuantConv2d, qnn.QuantLinear)
def quant_weight_layer(layer, ctx: Context) -> list[Op]:
    ops, current = [], ctx.inputs
    if layer.input_quant.is_quant_enabled:
        ops.append(_quant(layer.input_quant, ctx, current, ctx.tensor("in")))
        current = [ctx.tensor("in")]
    if not layer.weight_quant.is_quant_enabled:
        raise ExportError(f"{ctx.layer}: a Brevitas layer with weight quantization disabled; use nn.{type(layer).__bases__[-1].__name__}")
    output_quant = layer.output_quant.is_quant_enabled
    weighted = weighted_op(layer, ctx, current, _weights(layer, ctx.layer), float_array(layer.bias))
    if output_quant:
        weighted.output = ctx.tensor("acc")
    ops.append(weighted)
    if output_quant:
        ops.append(_quant(layer.output_quant, ctx, [weighted.output], ctx.output))
    return ops


@module_adapter(qnn.QuantReLU)
def quant_relu(layer, ctx: Context) -> list[Op]:
    return [Op("relu", ctx.inputs, ctx.tensor("relu"), ctx.layer),
            _quant(layer.act_quant, ctx, [ctx.tensor("relu")], ctx.output)]


@module_adapter(qnn.QuantHardTanh)
def quant_hardtanh(layer, ctx: Context) -> list[Op]:
    # Brevitas' QuantHardTanh clamps through its quantizer's range (min_val/max_val).
    return [_quant(layer.act_quant, ctx, ctx.inputs, ctx.output)]


@module_adapter(qnn.QuantIdentity)
def quant_identity(layer, ctx: Context) -> list[Op]:
    if not layer.act_quant.is_quant_enabled:
        return []
    return [_quant(layer.act_quant, ctx, ctx.inputs, ctx.output)]
