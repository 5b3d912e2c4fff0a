"""A binary conv and what follows it in a BNN block as one op (``torch.ops.qtool.binary_conv2d_fused``).

``fuse_binary(conversion)`` takes the per-layer kernel model of ``qtool.lowbit.runtime.convert``,
traces it (torch.fx) and folds into each ``KernelBinaryConv2d`` the chain of nodes after it, as
long as each node is the previous one's only user and the order fits the op's epilogue:

    dot * scale + bias -> [ReLU] -> [BatchNorm2d, eval] -> [+ another tensor] -> [ReLU]

``ReLUBatchNorm2d`` (ReSTE's ReLU-then-BN) counts as ReLU + BatchNorm. This covers Bi-Real blocks
(``BN(ReLU(conv(x))) + x``) and classic ones (``ReLU(BN(conv(x)))``, ``ReLU(BN(conv(x)) + shortcut)``).
The op applies the epilogue to each output tile while it is in cache, so a block costs one pass
over its output instead of four or five PyTorch ops. Batch norm becomes ``y * a + b`` with
``a = w / sqrt(var + eps)``: the outputs equal the unfused model's to float32 rounding.

A model fx cannot trace keeps its per-layer conversion, with the reason in ``kept``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtool.lowbit.ops import conv_output_shape
from qtool.lowbit.runtime import Conversion, KernelBinaryConv2d
from qtool.quant.binary import ReLUBatchNorm2d

RELUS = (F.relu, torch.relu)
ADDS = (operator.add, operator.iadd, torch.add)  # `out += shortcut` (torchvision blocks) too

# Where a node may join the epilogue: positions after the conv, in the op's order.
AFTER_CONV, AFTER_RELU, AFTER_BN, AFTER_ADD, AFTER_LAST_RELU = range(5)


class FusedBinaryConv2d(nn.Module):
    """A ``KernelBinaryConv2d`` with its epilogue; ``forward(x, residual=None)``."""

    def __init__(self, conv: KernelBinaryConv2d, relu_first: bool, bn: nn.BatchNorm2d | None,
                 residual: bool, relu_last: bool):
        super().__init__()
        self.in_channels, self.kernel_size, self.stride = conv.in_channels, conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.register_buffer("weight_bits", conv.weight_bits)
        self.register_buffer("scale", conv.scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.reshape(-1).contiguous())
        post_scale, post_shift = _bn_affine(bn) if bn is not None else (None, None)
        self.register_buffer("post_scale", post_scale)
        self.register_buffer("post_shift", post_shift)
        self.relu_first, self.takes_residual, self.relu_last = relu_first, residual, relu_last

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # Attribute lookups on a module cost about as much as the op at batch 1: read them once.
        head, tail = self._arguments or self._gather_arguments()
        try:
            return torch.ops.qtool.binary_conv2d_fused(x, *head, residual, *tail)
        except RuntimeError:
            if residual is None or residual.shape == conv_output_shape(
                    x, self.weight_bits, self.kernel_size, self.stride, self.padding, self.dilation):
                raise
            return self._broadcast_add(x, residual)  # an add that broadcasts: not the op's

    _arguments = None

    def _gather_arguments(self) -> tuple[tuple, tuple]:
        self._arguments = ((self.weight_bits, self.in_channels, self.kernel_size, self.stride, self.padding,
                            self.dilation, self.scale, self.bias, self.relu_first, self.post_scale, self.post_shift),
                           (self.relu_last,))
        return self._arguments

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() replace the buffers
        self._arguments = None
        return super()._apply(fn, *args, **kwargs)

    def _broadcast_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        head, _ = self._arguments or self._gather_arguments()
        y = torch.ops.qtool.binary_conv2d_fused(x, *head, None, False) + residual
        return torch.relu(y) if self.relu_last else y

    def describe(self) -> str:
        parts = ["relu"] * self.relu_first + ["bn"] * (self.post_scale is not None)
        parts += ["add"] * self.takes_residual + ["relu"] * self.relu_last
        return "binary + " + ", ".join(parts)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``x * a + b`` (float32, per channel)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = weight / torch.sqrt(var + bn.eps)
    return a.float().contiguous(), (bias - mean * a).float().contiguous()


class _Tracer(fx.Tracer):
    """Binary convs, batch norms and every module without children are leaves; containers (blocks,
    stages, the network) are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (KernelBinaryConv2d, nn.BatchNorm2d)) or not list(m.children()) \
            or super().is_leaf_module(m, qualname)


def fuse_binary(conversion: Conversion) -> Conversion:
    """``conversion`` with each binary conv's epilogue fused into its op (see the module doc)."""
    model = conversion.model
    if not any(isinstance(m, KernelBinaryConv2d) for m in model.modules()):
        return conversion
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - untraceable: the per-layer conversion still runs
        kept = {**conversion.kept, "(binary epilogues)": f"not fused: torch.fx cannot trace the model ({error})"[:200]}
        return Conversion(model, conversion.converted, kept)
    traced = fx.GraphModule(model, graph)
    converted = dict(conversion.converted)
    for node in list(traced.graph.nodes):
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), KernelBinaryConv2d):
            described = _fuse_chain(traced, node)
            if described:
                converted[node.target] = described
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return Conversion(traced, converted, dict(conversion.kept))


def _fuse_chain(traced: fx.GraphModule, conv_node: fx.Node) -> str | None:
    position, chain = AFTER_CONV, []
    relu_first = relu_last = False
    bn, residual = None, None
    current = conv_node
    while len(current.users) == 1:
        user = next(iter(current.users))
        kind = _kind(traced, user, current)
        if kind == "relu" and position == AFTER_CONV:
            relu_first, position = True, AFTER_RELU
        elif kind == "relu" and position in (AFTER_BN, AFTER_ADD):
            relu_last, position = True, AFTER_LAST_RELU
        elif kind == "relu_bn" and position in (AFTER_CONV, AFTER_RELU):  # ReLU twice is ReLU once
            relu_first, bn, position = True, traced.get_submodule(user.target), AFTER_BN
        elif kind == "bn" and position in (AFTER_CONV, AFTER_RELU):
            bn, position = traced.get_submodule(user.target), AFTER_BN
        elif kind == "add" and position < AFTER_ADD:
            residual = user.args[1] if user.args[0] is current else user.args[0]
            position = AFTER_ADD
        else:
            break
        chain.append(user)
        current = user
    if not chain:
        return None
    fused = FusedBinaryConv2d(traced.get_submodule(conv_node.target), relu_first, bn, residual is not None, relu_last)
    name = f"{conv_node.target}_fused".replace(".", "_")
    traced.add_submodule(name, fused)
    last = chain[-1]
    with traced.graph.inserting_after(last):
        args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
        node = traced.graph.call_module(name, args)
    last.replace_all_uses_with(node)
    for dead in reversed([conv_node, *chain]):
        traced.graph.erase_node(dead)
    return fused.describe()


def _kind(traced: fx.GraphModule, node: fx.Node, source: fx.Node) -> str | None:
    """What ``node`` does to ``source`` as far as the epilogue can take it: relu, bn, relu_bn, add."""
    if node.op == "call_module":
        module = traced.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and not module.training:
            return "relu_bn" if isinstance(module, ReLUBatchNorm2d) else "bn" if type(module) is nn.BatchNorm2d else None
        return None
    if node.op == "call_function" and node.target in RELUS and node.args[0] is source and not node.kwargs.get("inplace"):
        return "relu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    if node.op == "call_function" and node.target in ADDS and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is source else node.args[0]
        if isinstance(other, fx.Node) and other is not source:
            return "add"
    return None


__all__ = ["FusedBinaryConv2d", "fuse_binary"]
