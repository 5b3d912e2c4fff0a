"""Per-layer-type adapters: one small function per PyTorch layer (or function) type that says
which IR ops it computes.

A new layer family plugs in with ``@module_adapter(ItsClass)`` and a function
``(module, ctx) -> list[Op]`` that reads the layer's integer codes and scales; nothing else in
the exporter changes. qtool's LSQ layers and the torch layers are here, Brevitas' in
``brevitas.py``; binary layers register the same way. Subclasses are matched before their bases
(``QuantConv2d`` before ``nn.Conv2d``), in registration order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import QtoolError
from qtool.exporters.ir import Grid, Op, Weights
from qtool.quant.integer import IntegerAdd, IntegerMul


class ExportError(QtoolError):
    """The model holds something the exporter cannot map; names the layer and the op."""


@dataclass
class Context:
    """What an adapter knows about the call it translates."""

    layer: str                 # PyTorch module name (or the traced node's name for functions)
    inputs: list[str]          # IR tensor names of the tensor arguments
    output: str                # IR tensor name of the result
    args: tuple = ()           # the call's non-tensor arguments, for function adapters
    kwargs: dict | None = None
    output_shape: tuple = ()   # without the batch dimension
    input_shapes: tuple = ()   # of the tensor arguments, without the batch dimension
    pieces: int = 0            # for an op returning several tensors (chunk, split): how many; named NAME__i
    target: object = None      # the traced function or method name, for function adapters

    def tensor(self, suffix: str) -> str:
        """A name for an intermediate tensor of this layer."""
        return f"{self.output}__{suffix}"

    def arg(self, index: int, name: str, default=None):
        if len(self.args) > index:
            return self.args[index]
        return (self.kwargs or {}).get(name, default)


ModuleAdapter = Callable[[nn.Module, Context], list[Op]]
FunctionAdapter = Callable[[Context], list[Op]]
_MODULES: list[tuple[type, ModuleAdapter]] = []
_FUNCTIONS: dict[object, FunctionAdapter] = {}
_METHODS: dict[str, FunctionAdapter] = {}


def module_adapter(*classes: type):
    def register(function: ModuleAdapter) -> ModuleAdapter:
        for cls in classes:
            _MODULES.append((cls, function))
        _MODULES.sort(key=lambda item: -len(item[0].__mro__))  # most derived class first
        return function
    return register


def function_adapter(*targets):
    def register(function: FunctionAdapter) -> FunctionAdapter:
        for target in targets:
            (_METHODS if isinstance(target, str) else _FUNCTIONS).__setitem__(target, function)
        return function
    return register


def find_module_adapter(module: nn.Module) -> ModuleAdapter | None:
    return next((adapter for cls, adapter in _MODULES if isinstance(module, cls)), None)


def find_function_adapter(target) -> FunctionAdapter | None:
    return _METHODS.get(target) if isinstance(target, str) else _FUNCTIONS.get(target)


def is_leaf(module: nn.Module) -> bool:
    return find_module_adapter(module) is not None


# -- shared pieces ------------------------------------------------------------------------

def float_array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().double().numpy()


def per_channel(scale: np.ndarray, channels: int) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    return np.full(channels, scale[0]) if scale.size == 1 else scale


def conv_attrs(conv: nn.Conv2d, ctx: Context) -> dict:
    if conv.padding_mode != "zeros":
        raise ExportError(f"{ctx.layer}: Conv2d padding_mode={conv.padding_mode!r} cannot be exported; use 'zeros'")
    if isinstance(conv.padding, str):
        raise ExportError(f"{ctx.layer}: Conv2d padding={conv.padding!r} cannot be exported; give the padding in pixels")
    return {"stride": tuple(conv.stride), "padding": tuple(conv.padding), "dilation": tuple(conv.dilation),
            "groups": conv.groups}


def weighted_op(module: nn.Module, ctx: Context, inputs: list[str], weights: Weights | None,
                bias: np.ndarray | None) -> Op:
    """A conv or linear op; ``weights=None`` keeps the float weight (a layer the plan left in float)."""
    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    attrs = conv_attrs(module, ctx) if kind == "conv" else {}
    attrs.update(bias=bias, weights=weights)
    if weights is None:
        attrs["weight"] = float_array(module.weight)
    return Op(kind, inputs, ctx.output, ctx.layer, attrs)


# -- torch layers -----------------------------------------------------------------------

@module_adapter(nn.Conv2d, nn.Linear)
def float_layer(module, ctx):
    return [weighted_op(module, ctx, ctx.inputs, None, float_array(module.bias))]


@module_adapter(nn.BatchNorm2d, nn.BatchNorm1d)
def batchnorm(bn, ctx):
    if bn.training and not bn.track_running_stats:
        raise ExportError(f"{ctx.layer}: BatchNorm without running statistics cannot be exported")
    mean = float_array(bn.running_mean)
    var = float_array(bn.running_var)
    weight = float_array(bn.weight) if bn.affine else np.ones_like(mean)
    bias = float_array(bn.bias) if bn.affine else np.zeros_like(mean)
    mul = weight / np.sqrt(var + bn.eps)
    return [Op("batchnorm", ctx.inputs, ctx.output, ctx.layer, {"mul": mul, "add": bias - mean * mul})]


@module_adapter(nn.GroupNorm)
def groupnorm(gn, ctx):
    channels = gn.num_channels
    weight = float_array(gn.weight) if gn.affine else np.ones(channels)
    bias = float_array(gn.bias) if gn.affine else np.zeros(channels)
    return [Op("groupnorm", ctx.inputs, ctx.output, ctx.layer,
               {"groups": gn.num_groups, "eps": gn.eps, "mul": weight, "add": bias})]


@module_adapter(nn.ReLU)
def relu(module, ctx):
    return [Op("relu", ctx.inputs, ctx.output, ctx.layer)]


@module_adapter(IntegerAdd, IntegerMul)
def integer_join(module, ctx):
    # operands in the model's order: QLinearAdd's / QLinearMul's first input is the join's ``a``
    return [Op("add" if isinstance(module, IntegerAdd) else "mul", ctx.inputs, ctx.output, ctx.layer)]


@module_adapter(nn.ReLU6, nn.Hardtanh)
def hardtanh(module, ctx):
    lo, hi = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (float(module.min_val), float(module.max_val))
    return [Op("clip", ctx.inputs, ctx.output, ctx.layer, {"lo": lo, "hi": hi})]


@module_adapter(nn.Identity, nn.Dropout, nn.Dropout2d)
def identity(module, ctx):
    return []  # the capture aliases the output to the input


@module_adapter(nn.MaxPool2d)
def maxpool(module, ctx):
    return [Op("maxpool", ctx.inputs, ctx.output, ctx.layer, _pool_attrs(module.kernel_size, module.stride,
                                                                          module.padding, module.ceil_mode, ctx,
                                                                          dilation=module.dilation))]


@module_adapter(nn.AvgPool2d)
def avgpool(module, ctx):
    attrs = _pool_attrs(module.kernel_size, module.stride, module.padding, module.ceil_mode, ctx)
    if module.divisor_override is not None:
        raise ExportError(f"{ctx.layer}: AvgPool2d divisor_override cannot be exported")
    attrs["count_include_pad"] = bool(module.count_include_pad)
    return [Op("avgpool", ctx.inputs, ctx.output, ctx.layer, attrs)]


@module_adapter(nn.AdaptiveAvgPool2d)
def adaptive_avgpool(module, ctx):
    return _adaptive_avgpool(ctx, module.output_size)


@module_adapter(nn.Flatten)
def flatten_module(module, ctx):
    return _flatten(ctx, module.start_dim, module.end_dim)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _pool_attrs(kernel, stride, padding, ceil_mode, ctx, dilation=1) -> dict:
    if _pair(dilation) != (1, 1):
        raise ExportError(f"{ctx.layer}: dilated pooling cannot be exported")
    return {"kernel": _pair(kernel), "stride": _pair(stride if stride is not None else kernel),
            "padding": _pair(padding), "ceil_mode": bool(ceil_mode)}


def _adaptive_avgpool(ctx: Context, output_size) -> list[Op]:
    out = _pair(output_size)
    if out == (1, 1):
        return [Op("global_avgpool", ctx.inputs, ctx.output, ctx.layer)]
    in_size = tuple(ctx.input_shapes[0][-2:])
    if in_size[0] % out[0] or in_size[1] % out[1]:
        raise ExportError(f"{ctx.layer}: adaptive average pooling from {in_size} to {out} is not a fixed pooling window")
    kernel = (in_size[0] // out[0], in_size[1] // out[1])
    if kernel == (1, 1):
        return []
    return [Op("avgpool", ctx.inputs, ctx.output, ctx.layer,
               {"kernel": kernel, "stride": kernel, "padding": (0, 0), "ceil_mode": False, "count_include_pad": True})]


def _flatten(ctx: Context, start_dim: int, end_dim: int) -> list[Op]:
    rank = len(ctx.input_shapes[0]) + 1
    if start_dim != 1 or end_dim not in (-1, rank - 1):
        raise ExportError(f"{ctx.layer}: flatten({start_dim}, {end_dim}) cannot be exported; only flatten(1) keeps the batch")
    return [Op("flatten", ctx.inputs, ctx.output, ctx.layer)]


# -- functions and tensor methods ---------------------------------------------------------

# Elementwise functions of one tensor (and maybe a number): the IR op ``elementwise`` names one,
# and the ONNX writer evaluates it with exactly these torch calls when it tabulates codes.
ELEMENTWISE: dict[str, Callable[[torch.Tensor, float | None], torch.Tensor]] = {
    "sigmoid": lambda x, _: torch.sigmoid(x),
    "hardsigmoid": lambda x, _: F.hardsigmoid(x),
    "hardswish": lambda x, _: F.hardswish(x),
    "silu": lambda x, _: F.silu(x),
    "tanh": lambda x, _: torch.tanh(x),
    "gelu": lambda x, _: F.gelu(x),
    "add": lambda x, c: x + c,
    "sub": lambda x, c: x - c,
    "rsub": lambda x, c: c - x,
    "mul": lambda x, c: x * c,
    "div": lambda x, c: x / c,
    "clamp": lambda x, bounds: torch.clamp(x, *bounds),
}
ELEMENTWISE_MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish",
                       nn.SiLU: "silu", nn.Tanh: "tanh", nn.GELU: "gelu"}
ELEMENTWISE_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid",
                         F.hardsigmoid: "hardsigmoid", F.hardswish: "hardswish", F.silu: "silu",
                         torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", F.gelu: "gelu"}

@function_adapter(operator.add, operator.iadd, torch.add, "add", "add_")
def add(ctx):
    if (ctx.kwargs or {}).get("alpha", 1) != 1:
        raise ExportError(f"{ctx.layer}: add with alpha cannot be exported")
    if len(ctx.inputs) == 1:
        return _scalar_op(ctx, "add")
    if len(ctx.inputs) != 2:
        raise ExportError(f"{ctx.layer}: only the sum of two tensors (or a tensor and a number) exports")
    return [Op("add", ctx.inputs, ctx.output, ctx.layer)]


@function_adapter(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def mul(ctx):
    if len(ctx.inputs) == 1:
        return _scalar_op(ctx, "mul")
    return [Op("mul", ctx.inputs, ctx.output, ctx.layer)]


@function_adapter(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def sub(ctx):
    if len(ctx.inputs) == 1:
        return _scalar_op(ctx, "sub")
    raise ExportError(f"{ctx.layer}: the difference of two tensors cannot be exported")


@function_adapter(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def div(ctx):
    if len(ctx.inputs) == 1 and ctx.arg(0, "input") == ctx.inputs[0]:
        return _scalar_op(ctx, "div")
    raise ExportError(f"{ctx.layer}: only division of a tensor by a number can be exported")


def _scalar_op(ctx: Context, name: str) -> list[Op]:
    """tensor (+ - * /) number, either order: an elementwise function of one tensor."""
    first, second = ctx.arg(0, "input"), ctx.arg(1, "other")
    tensor_first = first == ctx.inputs[0]
    scalar = second if tensor_first else first
    if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
        raise ExportError(f"{ctx.layer}: {name} with a {type(scalar).__name__} operand cannot be exported")
    scalar = float(scalar)
    if name == "sub" and not tensor_first:
        return [_elementwise(ctx, "rsub", scalar)]
    return [_elementwise(ctx, name, scalar)]


def _elementwise(ctx: Context, function: str, scalar: float | None = None) -> Op:
    return Op("elementwise", ctx.inputs[:1], ctx.output, ctx.layer, {"function": function, "scalar": scalar})


@module_adapter(nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.Tanh, nn.GELU)
def activation_module(module, ctx):
    if isinstance(module, nn.GELU) and module.approximate != "none":
        raise ExportError(f"{ctx.layer}: GELU(approximate={module.approximate!r}) cannot be exported")
    return [_elementwise(ctx, ELEMENTWISE_MODULES[type(module)])]


@function_adapter(torch.sigmoid, F.sigmoid, "sigmoid", F.hardsigmoid, F.hardswish, F.silu, torch.tanh, F.tanh, "tanh",
                  F.gelu)
def activation_function(ctx):
    if (ctx.kwargs or {}).get("approximate", "none") != "none":
        raise ExportError(f"{ctx.layer}: gelu(approximate=...) cannot be exported")
    return [_elementwise(ctx, ELEMENTWISE_FUNCTIONS[ctx.target])]


@function_adapter(torch.mean, "mean")
def mean(ctx):
    dims = ctx.arg(1, "dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    rank = len(ctx.input_shapes[0]) + 1
    if rank != 4 or sorted(d % rank for d in dims) != [2, 3]:
        raise ExportError(f"{ctx.layer}: mean over dims {dims} cannot be exported; only the spatial mean (2, 3)")
    if ctx.arg(2, "keepdim", False):
        return [Op("global_avgpool", ctx.inputs, ctx.output, ctx.layer)]
    pooled = ctx.tensor("pooled")
    return [Op("global_avgpool", ctx.inputs, pooled, ctx.layer),
            Op("reshape", [pooled], ctx.output, ctx.layer, {"shape": tuple(ctx.output_shape)})]


@function_adapter(operator.getitem)
def getitem(ctx):
    """x[:, a:b] and the like: slices with constant bounds (no integer indexing of a dimension)."""
    index = ctx.arg(1, "index")
    index = index if isinstance(index, tuple) else (index,)
    starts, ends, axes, steps = [], [], [], []
    for axis, item in enumerate(index):
        if item is Ellipsis or not isinstance(item, slice):
            raise ExportError(f"{ctx.layer}: indexing with {item!r} cannot be exported; use slices")
        if axis == 0 and item != slice(None):
            raise ExportError(f"{ctx.layer}: slicing the batch dimension cannot be exported")
        if item == slice(None):
            continue
        starts.append(0 if item.start is None else item.start)
        ends.append(2**62 if item.stop is None else item.stop)
        steps.append(1 if item.step is None else item.step)
        axes.append(axis)
    if not axes:
        return []
    return [Op("slice", ctx.inputs[:1], ctx.output, ctx.layer, {"starts": starts, "ends": ends, "axes": axes, "steps": steps})]


@function_adapter(torch.chunk, "chunk", torch.split, "split")
def split(ctx):
    """chunk/split along one axis: one slice per piece, named NAME__i."""
    axis = ctx.arg(2, "dim", 0)
    rank = len(ctx.input_shapes[0]) + 1
    axis %= rank
    if axis == 0:
        raise ExportError(f"{ctx.layer}: splitting the batch dimension cannot be exported")
    size = ctx.input_shapes[0][axis - 1]
    how = ctx.arg(1, "chunks" if ctx.target in (torch.chunk, "chunk") else "split_size_or_sections")
    if ctx.target in (torch.chunk, "chunk"):
        width = -(-size // how)
        sizes = [min(width, size - start) for start in range(0, size, width)]
    elif isinstance(how, int):
        sizes = [min(how, size - start) for start in range(0, size, how)]
    else:
        sizes = list(how)
    ops, start = [], 0
    for index, width in enumerate(sizes):
        ops.append(Op("slice", ctx.inputs[:1], f"{ctx.output}__{index}", ctx.layer,
                      {"starts": [start], "ends": [start + width], "axes": [axis], "steps": [1]}))
        start += width
    return ops


@function_adapter(torch.transpose, "transpose")
def transpose(ctx):
    rank = len(ctx.input_shapes[0]) + 1
    a, b = ctx.arg(1, "dim0") % rank, ctx.arg(2, "dim1") % rank
    if 0 in (a, b):
        raise ExportError(f"{ctx.layer}: transposing the batch dimension cannot be exported")
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return [Op("transpose", ctx.inputs, ctx.output, ctx.layer, {"perm": perm})]


@function_adapter(torch.permute, "permute")
def permute(ctx):
    dims = ctx.args[1:] if len(ctx.args) > 2 or not isinstance(ctx.arg(1, "dims"), (tuple, list)) else ctx.arg(1, "dims")
    rank = len(ctx.input_shapes[0]) + 1
    perm = [int(d) % rank for d in dims]
    if perm[0] != 0:
        raise ExportError(f"{ctx.layer}: permuting the batch dimension cannot be exported")
    return [Op("transpose", ctx.inputs, ctx.output, ctx.layer, {"perm": perm})]


@function_adapter(torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze")
def squeeze(ctx):
    return [Op("reshape", ctx.inputs, ctx.output, ctx.layer, {"shape": tuple(ctx.output_shape)})]


@function_adapter(F.relu, torch.relu, "relu", "relu_")
def relu_function(ctx):
    return [Op("relu", ctx.inputs, ctx.output, ctx.layer)]


@function_adapter(F.relu6)
def relu6_function(ctx):
    return [Op("clip", ctx.inputs, ctx.output, ctx.layer, {"lo": 0.0, "hi": 6.0})]


@function_adapter(F.hardtanh)
def hardtanh_function(ctx):
    return _clip(ctx, ctx.arg(1, "min_val", -1.0), ctx.arg(2, "max_val", 1.0))


@function_adapter(torch.clamp, torch.clip, "clamp", "clip", "clamp_")
def clamp_function(ctx):
    return _clip(ctx, ctx.arg(1, "min"), ctx.arg(2, "max"))


def _clip(ctx: Context, lo, hi) -> list[Op]:
    if not all(value is None or isinstance(value, (int, float)) for value in (lo, hi)):
        raise ExportError(f"{ctx.layer}: clamp with tensor bounds cannot be exported")
    return [Op("clip", ctx.inputs, ctx.output, ctx.layer, {"lo": lo, "hi": hi})]


@function_adapter(torch.flatten, "flatten")
def flatten_function(ctx):
    return _flatten(ctx, ctx.arg(1, "start_dim", 0), ctx.arg(2, "end_dim", -1))


@function_adapter("view", "reshape", torch.reshape)
def reshape(ctx):
    return [Op("reshape", ctx.inputs, ctx.output, ctx.layer, {"shape": tuple(ctx.output_shape)})]


@function_adapter("contiguous", F.dropout)
def no_op(ctx):
    return []


@function_adapter(torch.cat, torch.concat)
def cat(ctx):
    axis = ctx.arg(1, "dim", 0)
    if axis == 0:
        raise ExportError(f"{ctx.layer}: concatenation along the batch dimension cannot be exported")
    return [Op("cat", ctx.inputs, ctx.output, ctx.layer, {"axis": axis})]


@function_adapter(F.adaptive_avg_pool2d)
def adaptive_avgpool_function(ctx):
    return _adaptive_avgpool(ctx, ctx.arg(1, "output_size"))


@function_adapter(F.max_pool2d)
def maxpool_function(ctx):
    kernel = ctx.arg(1, "kernel_size")
    return [Op("maxpool", ctx.inputs, ctx.output, ctx.layer,
               _pool_attrs(kernel, ctx.arg(2, "stride") or kernel, ctx.arg(3, "padding", 0),
                           ctx.arg(5, "ceil_mode", False), ctx, dilation=ctx.arg(4, "dilation", 1)))]


@function_adapter(F.avg_pool2d)
def avgpool_function(ctx):
    kernel = ctx.arg(1, "kernel_size")
    attrs = _pool_attrs(kernel, ctx.arg(2, "stride") or kernel, ctx.arg(3, "padding", 0), ctx.arg(4, "ceil_mode", False), ctx)
    attrs["count_include_pad"] = bool(ctx.arg(5, "count_include_pad", True))
    return [Op("avgpool", ctx.inputs, ctx.output, ctx.layer, attrs)]


# -- qtool's LSQ layers -------------------------------------------------------------------

def lsq_grid(quantizer, layer: str) -> Grid:
    if not bool(quantizer.initialized):
        raise ExportError(f"{layer}: its activation quantizer was never run (no scale yet); "
                          "run a batch of data through the model (or train it) before exporting")
    scale = float(quantizer.scale.detach().reshape(-1)[0])
    if scale == 0 or not np.isfinite(scale):
        raise ExportError(f"{layer}: its activation quantizer has scale {scale}; the model cannot be exported")
    if scale < 0:  # LSQ does not keep its step positive; s < 0 is the mirrored grid with step |s|
        return Grid(-scale, 0, -quantizer.qmax, -quantizer.qmin)
    return Grid(scale, 0, quantizer.qmin, quantizer.qmax)


def lsq_quant(quantizer, inputs: list[str], output: str, layer: str) -> Op:
    """A ``quant`` op for an LSQ quantizer; ``lsq`` keeps its signed float32 step and integer range,
    so that the ONNX writer can tabulate a function's codes with the quantizer's own arithmetic."""
    step = quantizer.scale.detach().float().reshape(-1)[:1].clone()
    return Op("quant", inputs, output, layer, {"grid": lsq_grid(quantizer, layer),
                                                "lsq": (step, quantizer.qmin, quantizer.qmax)})


def integer_weighted_op(layer: nn.Module, ctx: Context, inputs: list[str], input_step: torch.Tensor | None) -> Op:
    """A conv/linear op from the layer's integer view (``qtool.quant.integer``): the codes, steps
    and, with the input's step known, the int32 bias the trained model rounds to."""
    from qtool.quant.integer import integer_layer

    if not bool(layer.weight_quantizer.initialized):
        raise ExportError(f"{ctx.layer}: its weight quantizer was never run; run a batch or train before exporting")
    view = integer_layer(layer, input_step)
    if bool((view.weight_step == 0).any()):
        raise ExportError(f"{ctx.layer}: a weight scale is zero; the model cannot be exported")
    weights = Weights(view.codes.numpy(), view.weight_step.numpy(), view.lo, view.hi)
    op = weighted_op(layer, ctx, inputs, weights, None if view.bias is None else view.bias.numpy())
    if view.bias_codes is not None:
        op.attrs["bias_codes"] = view.bias_codes.numpy()
        op.attrs["bias_unit"] = view.unit.numpy()
    return op


def _register_qtool_layers() -> None:
    from qtool.quant.layers import QuantConv2d, QuantLinear
    from qtool.quant.lsq import LSQQuantizer

    @module_adapter(LSQQuantizer)
    def tensor_quantizer(quantizer, ctx):
        return [lsq_quant(quantizer, ctx.inputs, ctx.output, ctx.layer)]

    @module_adapter(QuantConv2d, QuantLinear)
    def lsq_layer(layer, ctx):
        if layer.input_quantizer is None:  # graph-prepared: the input is on its producer's grid already
            return [integer_weighted_op(layer, ctx, ctx.inputs, (ctx.kwargs or {}).get("input_step"))]
        quantized_input = ctx.tensor("in")
        return [lsq_quant(layer.input_quantizer, ctx.inputs, quantized_input, ctx.layer),
                integer_weighted_op(layer, ctx, [quantized_input], None)]


def _register_qtool_binary_layers() -> None:
    """``--bits 1`` networks: the sign activation as int8 {-1, +1}, the +-1 weights as int8 codes
    with the layer's mean|W| scale (per layer or per channel), and BN(ReLU(x))."""
    from qtool.quant.binary import BinaryConv2d, ReLUBatchNorm2d

    @module_adapter(BinaryConv2d)
    def binary_conv(layer, ctx):
        if layer.groups != 1:
            raise ExportError(f"{ctx.layer}: grouped binary convolutions cannot be exported")
        signs = ctx.tensor("sign")
        codes = layer.binary_weight().to(torch.int32).numpy()
        scale = per_channel(float_array(layer.weight_scale()), layer.out_channels)
        return [Op("sign", ctx.inputs, signs, ctx.layer, {"scale": 1.0}),
                weighted_op(layer, ctx, [signs], Weights(codes, scale, -1, 1), float_array(layer.bias))]

    @module_adapter(ReLUBatchNorm2d)
    def relu_batchnorm(bn, ctx):
        rectified = ctx.tensor("relu")
        return [Op("relu", ctx.inputs, rectified, ctx.layer), *batchnorm(bn, replace(ctx, inputs=[rectified]))]


_register_qtool_layers()
_register_qtool_binary_layers()
