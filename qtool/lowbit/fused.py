"""A graph-prepared qtool model as a chain of fused integer layer ops.

``fuse(model)`` walks the traced graph of ``qtool.prepare`` (every tensor the integer graph holds
is produced by a tensor quantizer under ``qtool_act.*``) and builds a new ``torch.fx.GraphModule``
that carries integer codes between the layers instead of fake-quantized floats:

- the network input's quantizer: float -> codes once (``quantize``, the fake quantizer's own
  ``round(clamp(x / s))``);
- each ``QuantConv2d``/``QuantLinear`` with the ReLU/clamp after it, the tensor quantizer after
  that and, when that quantizer feeds only a residual add of codes computed before, the add, the
  ReLU after it and the add's quantizer: one ``torch.ops.qtool.fused_conv2d`` /
  ``fused_linear`` call (``qtool.lowbit.fused_reference`` states the arithmetic; a layer the
  graph gives its output quantizer's step, ``output_step=``, requantizes with the same float32
  multiplier in the op as in PyTorch). Weights as int8
  codes in "lanes" panels (output channels in the vector lanes: the fast tiles for convolutions
  and small layers, any weight width up to 8 bits, int8 or uint8 input codes), or packed
  int4/int3 for the library's tiles (``weights="packed"``, or "auto" for layers too large for
  the cache, where the weights' memory traffic dominates);
- a layer whose output has no quantizer (the logits) returns float32 from the same op;
- movement ops (flatten, view, reshape, permute, max-pool, dropout, ...) and concatenations of
  codes on one grid run on the codes: exact, max-pool included (codes * step is monotonic);
- everything else falls back per node: its code inputs are dequantized (``codes * step``, the
  fake-quant model's float values bit for bit, in its contiguous layout), the original module or
  function runs in float, and a following quantizer makes codes again. Global average pooling
  goes this way (so its rounding is PyTorch's own), as do unfusable adds. Each fallback is listed
  with its reason in ``model.kept``; fused layers in ``model.fused``.

The result computes what the fake-quant model computes in eval mode, bit for bit: every code
tensor and the logits (the graph-prepared layers' eval forward sums integer codes exactly too,
``qtool.quant.integer.deployed_output``; docs/kernels.md, "Fused integer layers").
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtool.lowbit import fused_reference, ops
from qtool.quant.integer import IntegerAdd, integer_layer
from qtool.quant.layers import QuantConv2d, QuantizedLayer, QuantLinear
from qtool.quant.lsq import LSQQuantizer

__all__ = ["FusedModel", "convert", "dequantize", "fuse", "quantize"]

MAX_PACKED_K = 16320  # longest K whose packed int8 x int4 sums stay exact in float32 (fused_layer.cpp)
# "auto" packs a layer's weights 4/3-bit (the library's tiles, made for long rows and weights
# streamed from memory) when its int8 codes would take more than this; below, the int8 lanes
# tiles (output channels in the vector lanes) are faster: narrow convolutions, weights in cache.
PACK_ABOVE_BYTES = 1 << 20


# --------------------------------------------------------------- helpers the graph calls
def quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Codes of a float tensor on a quantizer's grid: LSQ's ``round(clamp(x / s))``, as uint8 for
    an unsigned grid and int8 for a signed one; 4-D tensors come out channels-last, as the conv
    ops want them."""
    dtype = fused_reference.codes_dtype(qmin, qmax)
    codes = torch.clamp(x / step, qmin, qmax).round_()
    if codes.dim() == 4:
        return codes.to(dtype, memory_format=torch.channels_last)
    return codes.to(dtype)


def dequantize(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes * step`` in float32 and contiguous memory: the fake-quant model's tensor, bit for bit."""
    return codes.contiguous().to(torch.float32) * step


def max_pool2d_codes(codes: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``F.max_pool2d`` on codes (exact: codes * step is monotonic in the codes)."""
    return F.max_pool2d(codes.to(torch.float32), *args, **kwargs).to(codes.dtype)


def linear_codes(x: torch.Tensor, *args) -> torch.Tensor:
    """``fused_linear`` on [..., K] codes."""
    if x.dim() == 2:
        return torch.ops.qtool.fused_linear(x, *args)
    out = torch.ops.qtool.fused_linear(x.reshape(-1, x.shape[-1]), *args)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------- values
@dataclass
class Codes:
    """A tensor of integer codes on ``quantizer``'s grid (``name``: its module path)."""

    node: fx.Node
    name: str
    quantizer: LSQQuantizer

    @property
    def step(self) -> float:
        return float(self.quantizer.scale.detach().float().reshape(()))

    @property
    def signed_int8(self) -> bool:
        """int8 codes, or uint8 codes that read the same as int8 (all below 128)."""
        return -128 <= self.quantizer.qmin and self.quantizer.qmax <= 127


@dataclass
class Float:
    node: fx.Node


class FusedModel(fx.GraphModule):
    """The fused graph; ``fused``: layer -> what its op does; ``kept``: node -> why it runs in
    float; ``codes``: quantizer module path -> the node of the fused graph holding its codes."""

    fused: dict[str, str]
    kept: dict[str, str]
    codes: dict[str, str]


_MOVEMENT_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_MOVEMENT_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                       torch.chunk, torch.split, operator.getitem}
_MOVEMENT_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                     "chunk", "split"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}


def _bounds(lo, hi) -> tuple[float, float]:
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


class _Fuser:
    def __init__(self, model: fx.GraphModule, weights: str = "auto"):
        self.source = model
        self.weights = weights
        self.modules = dict(model.named_modules())
        self.graph = fx.Graph()
        self.root = model  # the new module holds the old one's attributes (fallback modules, steps)
        self.env: dict[fx.Node, object] = {}
        self.consumed: set[fx.Node] = set()
        self.fused: dict[str, str] = {}
        self.kept: dict[str, str] = {}
        self.codes: dict[str, str] = {}
        self.count = 0
        self.dequantized: dict[int, fx.Node] = {}  # id of a Codes value -> its float node

    # -- new constants and nodes ---------------------------------------------------------
    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        self.count += 1
        attr = f"qtool_fused_{self.count}_{name}"
        self.root.register_buffer(attr, value.detach().clone().contiguous())
        return self.graph.get_attr(attr)

    def step_node(self, codes: Codes) -> fx.Node:
        return self.graph.get_attr(f"{codes.name}.scale")

    def as_float(self, value) -> fx.Node:
        if isinstance(value, Codes):
            if id(value) not in self.dequantized:
                self.dequantized[id(value)] = self.graph.call_function(dequantize, (value.node, self.step_node(value)))
            return self.dequantized[id(value)]
        return value.node

    def map_float(self, arg):
        """``arg`` with every graph node replaced by its float value in the new graph."""
        return fx.node.map_arg(arg, lambda n: self.as_float(self.env[n]) if n in self.env else self.graph_only(n))

    def graph_only(self, node: fx.Node) -> fx.Node:
        """A node without a value yet (get_attr): copied as it is."""
        if node.op == "get_attr":
            new = self.graph.get_attr(node.target)
            self.env[node] = Float(new)
            return new
        raise RuntimeError(f"fuse: node {node.name} is used before it is computed")

    def map_codes(self, arg):
        """``arg`` with code values as their code nodes (others as floats)."""
        def pick(n):
            value = self.env.get(n)
            return value.node if isinstance(value, Codes) else self.map_float(n)
        return fx.node.map_arg(arg, pick)

    # -- node kinds ------------------------------------------------------------------------
    def module(self, node: fx.Node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_quantizer(self, node: fx.Node) -> bool:
        return isinstance(self.module(node), LSQQuantizer)

    def clamp_bounds(self, node: fx.Node) -> tuple[float, float] | None:
        """(lo, hi) of a ReLU/ReLU6/Hardtanh/clamp node of one tensor, else None."""
        m = self.module(node)
        if m is not None:
            if isinstance(m, nn.ReLU):
                return 0.0, math.inf
            if isinstance(m, nn.ReLU6):
                return 0.0, 6.0
            if isinstance(m, nn.Hardtanh):
                return float(m.min_val), float(m.max_val)
            return None
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        extra = [a for a in node.args[1:] if not isinstance(a, bool)]
        if any(isinstance(a, fx.Node) for a in extra + list(kwargs.values())):
            return None
        if node.op == "call_function":
            if node.target in (F.relu, torch.relu, torch.relu_) and not extra and not kwargs:
                return 0.0, math.inf
            if node.target is F.relu6 and not extra and not kwargs:
                return 0.0, 6.0
            if node.target is F.hardtanh:
                lo = kwargs.get("min_val", extra[0] if extra else -1.0)
                hi = kwargs.get("max_val", extra[1] if len(extra) > 1 else 1.0)
                return float(lo), float(hi)
            if node.target in (torch.clamp, torch.clip):
                return _bounds(kwargs.get("min", extra[0] if extra else None),
                               kwargs.get("max", extra[1] if len(extra) > 1 else None))
        if node.op == "call_method":
            if node.target in ("relu", "relu_") and not extra and not kwargs:
                return 0.0, math.inf
            if node.target in ("clamp", "clamp_", "clip", "clip_"):
                return _bounds(kwargs.get("min", extra[0] if extra else None),
                               kwargs.get("max", extra[1] if len(extra) > 1 else None))
        return None

    def is_add(self, node: fx.Node) -> bool:
        """An add of two code tensors into a quantizer (``qtool.quant.graph`` made it an IntegerAdd)."""
        return isinstance(self.module(node), IntegerAdd) and len(node.args) == 2

    @staticmethod
    def only_user(node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def following_clamp(self, node: fx.Node) -> tuple[fx.Node, tuple[float, float]]:
        """``node`` and the clamp reading it alone, if there is one (else NO_CLAMP)."""
        user = self.only_user(node)
        if user is not None and user.args and user.args[0] is node:
            bounds = self.clamp_bounds(user)
            if bounds is not None and bounds[0] <= bounds[1]:
                return user, bounds
        return node, fused_reference.NO_CLAMP

    def following_quantizer(self, node: fx.Node) -> fx.Node | None:
        user = self.only_user(node)
        return user if user is not None and self.is_quantizer(user) and user.args[0] is node else None

    @staticmethod
    def usable_step(quantizer: LSQQuantizer) -> bool:
        step = float(quantizer.scale.detach().reshape(-1)[0]) if quantizer.scale.numel() == 1 else -1.0
        return bool(quantizer.initialized) and step > 0 and math.isfinite(step)

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> FusedModel:
        for node in self.source.graph.nodes:
            if node in self.consumed:
                continue
            if node.op == "placeholder":
                default = node.args[0] if node.args else inspect.Signature.empty
                self.env[node] = Float(self.graph.placeholder(node.target, default_value=default))
            elif node.op == "get_attr":
                continue  # copied where a fallback reads it; the fused ops take their own constants
            elif node.op == "output":
                self.graph.output(self.map_float(node.args[0]))
            elif self.is_quantizer(node):
                self.quantizer(node)
            elif isinstance(self.module(node), QuantizedLayer):
                reason = self.layer(node)
                if reason is not None:
                    self.fallback(node, reason)
            elif self.movement(node):
                pass
            else:
                self.fallback(node, None)
        self.graph.lint()
        fused = FusedModel(self.root, self.graph, class_name="FusedModel")
        fused.fused, fused.kept, fused.codes = self.fused, self.kept, self.codes
        return fused.eval()

    def quantizer(self, node: fx.Node) -> None:
        q = self.module(node)
        source = self.env[node.args[0]]
        if not self.usable_step(q):
            self.kept[node.name] = "quantizer with a non-positive or uninitialised step: fake quantization in float"
            self.env[node] = Float(self.graph.call_module(node.target, (self.as_float(source),)))
            return
        step = self.graph.get_attr(f"{node.target}.scale")
        new = self.graph.call_function(quantize, (self.as_float(source), step, q.qmin, q.qmax))
        self.set_codes(node, new, node.target, q)

    def set_codes(self, node: fx.Node, new: fx.Node, name: str, quantizer: LSQQuantizer) -> None:
        self.env[node] = Codes(new, name, quantizer)
        self.codes[name] = new.name

    def movement(self, node: fx.Node) -> bool:
        """Run a movement op (or a ReLU) on codes, or a shape query on any tensor; False when
        ``node`` is neither."""
        m = self.module(node)
        if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            values = [self.env.get(p) for p in parts] if isinstance(parts, (list, tuple)) else []
            if values and all(isinstance(v, Codes) and v.name == values[0].name for v in values):
                new = self.graph.call_function(node.target, *self.map_codes((node.args, node.kwargs)))
                self.env[node] = Codes(new, values[0].name, values[0].quantizer)
                return True
            return False
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        first = self.env.get(node.args[0])
        if node.op == "call_method" and node.target in _SHAPE_METHODS and first is not None:
            # the codes have the float tensor's shape
            self.env[node] = Float(self.graph.call_method(node.target, *self.map_codes((node.args, node.kwargs))))
            return True
        if not isinstance(first, Codes):
            return False
        if any(isinstance(self.env.get(a), Codes) for a in node.all_input_nodes if a is not node.args[0]):
            return False  # an op of two code tensors
        if isinstance(m, _MOVEMENT_MODULES[1:]) or (
                node.op == "call_function" and node.target in (F.dropout, F.dropout2d)
                and node.kwargs.get("training", True) is False):
            self.env[node] = first  # identity in eval mode
            return True
        args, kwargs = self.map_codes((node.args, node.kwargs))
        bounds = self.clamp_bounds(node)
        if bounds is not None:
            if bounds != (0.0, math.inf):
                return False
            new = self.graph.call_method("clamp_min", (first.node, 0))  # ReLU on codes (step > 0): exact
        elif isinstance(m, nn.Flatten):
            new = self.graph.call_method("flatten", (first.node, m.start_dim, m.end_dim))
        elif isinstance(m, nn.MaxPool2d) or (node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS):
            if isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    return False
                new = self.graph.call_function(max_pool2d_codes, (first.node, m.kernel_size, m.stride, m.padding,
                                                                  m.dilation, m.ceil_mode))
            else:
                if node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6]):
                    return False
                new = self.graph.call_function(max_pool2d_codes, tuple(args), kwargs)
        elif node.op == "call_function" and node.target in _MOVEMENT_FUNCTIONS:
            new = self.graph.call_function(node.target, tuple(args), kwargs)
        elif node.op == "call_method" and node.target in _MOVEMENT_METHODS:
            # conv codes are channels-last: a view needs the logical (NCHW) order in memory
            receiver = self.graph.call_method("contiguous", (args[0],)) if node.target == "view" else args[0]
            new = self.graph.call_method(node.target, (receiver,) + tuple(args[1:]), kwargs)
        else:
            return False
        self.env[node] = Codes(new, first.name, first.quantizer)
        return True

    def fallback(self, node: fx.Node, reason: str | None) -> None:
        codes_in = [a for a in node.all_input_nodes if isinstance(self.env.get(a), Codes)]
        args, kwargs = self.map_float((node.args, node.kwargs))
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        self.env[node] = Float(new)
        if reason is None and not codes_in:
            return  # float work between float values (none in a graph-prepared model but the logits')
        if reason is None:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            m = self.module(node)
            kind = type(m).__name__ if m is not None else what
            reason = f"{kind} on codes: dequantized, run in float32 as in PyTorch"
        self.kept[node.name] = reason

    # -- quantized layers ----------------------------------------------------------------
    def layer(self, node: fx.Node) -> str | None:
        """Emit the fused op of a quantized layer (and what follows it); a reason when it cannot."""
        layer = self.module(node)
        source = self.env.get(node.args[0]) if node.args else None
        step = node.kwargs.get("input_step")
        if not isinstance(source, Codes):
            return "its input is not a tensor of codes"
        if not (isinstance(step, fx.Node) and step.op == "get_attr" and step.target == f"{source.name}.scale"):
            return "its input step is not its input quantizer's"
        if len(node.args) != 1 or not set(node.kwargs) <= {"input_step", "output_step", "output_ready"}:
            return "called with extra arguments"
        if not bool(layer.weight_quantizer.initialized):
            return "uninitialised weight quantizer"
        if not self.usable_step(source.quantizer):
            return "input quantizer with a non-positive step"
        if isinstance(layer, QuantConv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                               or isinstance(layer.padding, str)):
            return "grouped, non-zero-padded or 'same'-padded convolution"
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            return f"{type(layer).__name__} is not a conv or linear layer"

        view = integer_layer(layer, source.quantizer.scale)
        rows = view.codes.permute(0, 2, 3, 1) if view.codes.dim() == 4 else view.codes
        rows = rows.reshape(rows.shape[0], -1)
        K = rows.shape[1]
        if view.lo < -128 or view.hi > 127:
            return f"weight codes [{view.lo}, {view.hi}] do not fit int8"
        packable = source.signed_int8 and K <= MAX_PACKED_K and view.lo >= -8 and view.hi <= 7
        if self.weights == "packed" or (self.weights == "auto" and rows.numel() > PACK_ABOVE_BYTES):
            bits = (3 if view.lo >= -4 and view.hi <= 3 else 4) if packable else 8
        else:
            bits = 8
        weight = ops.pack_weights(rows, bits) if bits != 8 else fused_reference.lanes_weights(rows)
        input_step = source.quantizer.scale.detach().abs().float().reshape(())
        unit = view.unit if view.unit is not None else input_step * view.weight_step.float()
        bias = view.bias_codes if view.bias_codes is not None else torch.zeros(rows.shape[0], dtype=torch.int32)

        # what follows: clamp -> quantizer [-> add of other codes -> clamp -> quantizer]
        end, clamp = self.following_clamp(node)
        q1 = self.following_quantizer(end)
        # A layer given its output quantizer's step (once that quantizer is initialised:
        # output_ready) requantizes with one float32 multiplier per channel, float32(unit / step)
        # (qtool.quant.integer.deployed_output); the op does the same.
        output_step, ready = node.kwargs.get("output_step"), node.kwargs.get("output_ready")
        if isinstance(ready, fx.Node) and ready.op == "get_attr":
            ready = bool(self.source.get_buffer(ready.target))
        multiplier = None
        if output_step is not None and (ready is None or ready is True):
            if not (isinstance(output_step, fx.Node) and output_step.op == "get_attr" and q1 is not None
                    and output_step.target == f"{q1.target}.scale" and self.usable_step(self.module(q1))):
                return "its output step is not that of the quantizer after it"
            out = self.module(q1).scale.detach().abs().float().reshape(())
            multiplier = unit.float() / out
        epilogue = [list(clamp), 0.0, [0, 0], None, 0.0, list(fused_reference.NO_CLAMP), 0.0, [0, 0], False]
        parts = [f"int{bits} packed" if bits != 8 else "int8 lanes",
                 "conv" if isinstance(layer, QuantConv2d) else "linear"]
        if clamp != fused_reference.NO_CLAMP:
            parts.append(f"clamp{clamp}")
        out_name = out_quantizer = None
        consumed = [end] if end is not node else []
        if q1 is not None and self.usable_step(self.module(q1)):
            quantizer = self.module(q1)
            epilogue[1:3] = [float(quantizer.scale.detach().float().reshape(())), [quantizer.qmin, quantizer.qmax]]
            consumed.append(q1)
            out_name, out_quantizer, last = q1.target, quantizer, q1
            parts.append(("requantized into " if multiplier is not None else "") + q1.target)
            residual = self.residual(q1)
            if residual is not None:
                add, other, add_end, add_clamp, q2 = residual
                quantizer2 = self.module(q2)
                step2 = float(quantizer2.scale.detach().float().reshape(()))
                residual_first = add.args[0] is not q1  # QLinearAdd's operand order is the model's
                epilogue[3:] = [other.node, other.step, list(add_clamp), step2, [quantizer2.qmin, quantizer2.qmax],
                                residual_first]
                consumed += [add] + ([add_end] if add_end is not add else []) + [q2]
                out_name, out_quantizer, last = q2.target, quantizer2, q2
                parts.append(f"+ {other.name}")
                if add_clamp != fused_reference.NO_CLAMP:
                    parts.append(f"clamp{add_clamp}")
                parts.append(q2.target)
        else:
            last = end
            parts.append("float output")

        x = source.node
        if bits != 8 and source.quantizer.qmin >= 0:  # uint8 codes below 128: the same bytes as int8
            x = self.graph.call_method("view", (x, torch.int8))
        tensors = (self.constant("w", weight), self.constant("bias", bias.to(torch.int32)),
                   self.constant("unit", unit.float().reshape(-1)),
                   None if multiplier is None else self.constant("multiplier", multiplier.float().reshape(-1)))
        if isinstance(layer, QuantConv2d):
            geometry = (list(layer.kernel_size), list(layer.stride), list(layer.padding), list(layer.dilation))
            new = self.graph.call_function(torch.ops.qtool.fused_conv2d.default,
                                           (x, *tensors, bits, *geometry, *epilogue))
        else:
            new = self.graph.call_function(linear_codes, (x, *tensors, bits, *epilogue))
        self.consumed.update(consumed)
        self.fused[node.target] = " ".join(parts)
        if out_name is None:
            self.env[last] = Float(new)
        else:
            self.set_codes(last, new, out_name, out_quantizer)
        return None

    def residual(self, q1: fx.Node):
        """(add, other codes, end of the clamp after the add, its bounds, quantizer after it) when
        ``q1``'s codes feed only an add of codes computed before, itself quantized; else None."""
        add = self.only_user(q1)
        if add is None or not self.is_add(add):
            return None
        a, b = add.args
        other_node = b if a is q1 else a
        if other_node is q1:
            return None  # x + x
        other = self.env.get(other_node)
        if not isinstance(other, Codes) or not self.usable_step(other.quantizer):
            return None
        add_end, add_clamp = self.following_clamp(add)
        q2 = self.following_quantizer(add_end)
        if q2 is None or not self.usable_step(self.module(q2)):
            return None
        return add, other, add_end, add_clamp, q2


@torch.no_grad()
def fuse(model: fx.GraphModule, weights: str = "auto") -> FusedModel:
    """The fused integer version of a graph-prepared, calibrated qtool model (``qtool.prepare``
    with the default graph placement, one batch run through it), in eval mode; ``model`` is not
    modified. ``weights``: "lanes" (int8 codes, output channels in the vector lanes), "packed"
    (int4/int3 packing where the weight codes and input codes allow it) or "auto" (packed only
    for layers whose int8 codes pass ``PACK_ABOVE_BYTES``)."""
    if not isinstance(model, fx.GraphModule) or not hasattr(model, "qtool_act"):
        raise TypeError("fuse takes a graph-prepared model (qtool.prepare(..., placement='graph')); "
                        "a layer-swapped model runs on qtool.lowbit.runtime.convert instead")
    if weights not in ("auto", "lanes", "packed"):
        raise ValueError(f"weights must be 'auto', 'lanes' or 'packed', got {weights!r}")
    return _Fuser(copy.deepcopy(model).eval(), weights).run()


def convert(model: nn.Module):
    """``fuse`` as a ``qtool.lowbit.runtime.Conversion`` (model, converted, kept) for a
    graph-prepared model; ``runtime.convert`` (per-layer packed kernels) for any other, such as
    the layer-swapped binary networks, whose binary convs then take their epilogues
    (``qtool.lowbit.binary_fused``). A drop-in for ``runtime.convert`` in the benchmarks."""
    from qtool.lowbit import runtime
    from qtool.lowbit.binary_fused import fuse_binary

    if not (isinstance(model, fx.GraphModule) and hasattr(model, "qtool_act")):
        return fuse_binary(runtime.convert(model))
    fused_model = fuse(model)
    return runtime.Conversion(fused_model, dict(fused_model.fused), dict(fused_model.kept))
