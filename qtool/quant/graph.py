"""Quantizer placement on the traced graph: the model qtool trains is the integer graph that
onnxruntime (or qtool's kernels) will run.

    trace (torch.fx) -> fold each BatchNorm into the conv/linear before it -> weight-only LSQ
    layers -> one LSQ quantizer on every tensor the integer graph materializes

The materialized tensors are the ones onnxruntime's fused QDQ graph holds as integer codes: the
network input, and the output of every conv, linear, add, mul, pooling and elementwise
function (taken after the ReLU/clamp that follows it, whose bounds then become the codes'
bounds). Movement ops (max-pool, flatten/view, slicing, chunk/split, transpose, dropout) and
clamps pass codes through unchanged, so they share their input's quantizer; the inputs of a
concatenation share one quantizer, so that Concat joins their codes as they are. The logits
stay float (QGemm with a float output).

After QAT, every tensor the deployed graph holds as integers is, in PyTorch, already on that
grid, and the layers compute the deployed bias rounding in eval mode
(``qtool.quant.integer``): the export reproduces the trained model instead of approximating it.
"""

from __future__ import annotations

import builtins
import operator
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qtool.quant.integer import IntegerAdd, IntegerJoin, IntegerMul
from qtool.quant.layers import QuantConv2d, QuantizedLayer, QuantLinear
from qtool.quant.lsq import LSQQuantizer

GRAPH_KEY = "*graph*"    # the plan entry that marks graph placement and holds its options
ACT_CONTAINER = "qtool_act"  # the GraphModule attribute holding the tensor quantizers
JOIN_CONTAINER = "qtool_join"  # ... and the adds and muls that join codes as the deployed graph does
# what the passes below give the layers and adds: steps read off the quantizers around them
GRAPH_KWARGS = ("input_step", "output_step", "output_ready", "steps", "signed", "ready")
MAX_WEIGHT_BITS = 7      # see edge_weight_bits

_MOVEMENT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ChannelShuffle)
_CLAMP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_MOVEMENT_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.chunk,
                       torch.split, torch.squeeze, torch.unsqueeze, F.max_pool2d, F.dropout, F.dropout2d,
                       F.channel_shuffle, torch.channel_shuffle}
_MOVEMENT_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "chunk", "split", "squeeze",
                     "unsqueeze"}
_CLAMP_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, torch.clip}
_CLAMP_METHODS = {"relu", "relu_", "clamp", "clamp_", "clip"}
_SHAPE_METHODS = {"size", "dim", "numel"}
# Functions of one tensor (and numbers): the integer graph computes a whole chain of them as one
# 256-entry table from the codes before to the codes after, so only the chain's end is quantized.
_ELEMENTWISE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.Tanh, nn.GELU)
_ELEMENTWISE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.hardswish, F.silu, torch.tanh, F.tanh, F.gelu}
_ELEMENTWISE_METHODS = {"sigmoid", "tanh"}
_ARITHMETIC = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
               operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_ARITHMETIC_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}


class GraphTraceError(Exception):
    """torch.fx cannot trace the model; ``prepare`` falls back to the layer swap."""


# Subclasses of torch layers known to compute exactly what their base class does (timm's Linear
# only casts its weight for AMP): leaves, quantized like the base class.
SAME_AS_BASE = {"timm.layers.linear.Linear"}


def _same_as_base(module: nn.Module) -> bool:
    return f"{type(module).__module__}.{type(module).__qualname__}" in SAME_AS_BASE


class _Tracer(fx.Tracer):
    """torch.nn layers and qtool's quantizers are leaves; everything else is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (QuantizedLayer, LSQQuantizer, IntegerJoin)) or _same_as_base(module)
                or super().is_leaf_module(module, qualified_name))


def split_norm_act(model: nn.Module) -> None:
    """Replace, in place, each batch norm that also applies an activation (timm's
    ``BatchNormAct2d``: a BatchNorm2d subclass with ``drop`` and ``act``) by the plain BatchNorm2d
    followed by the two, so the norm folds into its conv and the activation is seen."""
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.BatchNorm2d) and type(module).__module__.split(".")[0] != "torch"
                and isinstance(getattr(module, "act", None), nn.Module)):
            continue
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device=module.running_mean.device if module.running_mean is not None else None)
        plain.load_state_dict({k: v for k, v in module.state_dict().items()
                               if not k.startswith(("act.", "drop."))})
        plain.train(module.training)
        drop = module.drop if isinstance(getattr(module, "drop", None), nn.Module) else nn.Identity()
        _set_module(model, name, nn.Sequential(plain, drop, module.act))


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's graph, traced in eval mode (a ``self.training`` branch is frozen as deployed)."""
    split_norm_act(model)
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphTraceError(first[:200]) from None
    finally:
        model.train(was_training)
    module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    module.train(was_training)
    return module


# -- what each node is -------------------------------------------------------------------

def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (int, float))


class _Roles:
    """Classifies the nodes of a traced graph (see the module docstring)."""

    def __init__(self, module: fx.GraphModule):
        self.modules = dict(module.named_modules())
        self.tensor: dict[fx.Node, bool] = {}
        for node in module.graph.nodes:
            self.tensor[node] = self._is_tensor(node)

    def _is_tensor(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "call_module"):
            return True
        if node.op in ("get_attr", "output"):
            return False
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return False
        if node.op == "call_function" and node.target is builtins.getattr:
            return False
        return any(self.tensor.get(arg, False) for arg in node.all_input_nodes)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        flat = []
        fx.node.map_arg((node.args, node.kwargs), flat.append)
        return [arg for arg in flat if self.tensor.get(arg, False)]

    def of(self, node: fx.Node) -> str:
        """input, output, weighted, clamp, elementwise, movement, cat, quantizer, compute or none."""
        if node.op in ("placeholder", "output"):
            return "input" if node.op == "placeholder" else "output"
        if not self.tensor[node]:
            return "none"
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, LSQQuantizer):
                return "quantizer"
            if isinstance(module, _ELEMENTWISE_MODULES):
                return "elementwise"
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                return "weighted"
            if isinstance(module, _CLAMP_MODULES):
                return "clamp"
            if isinstance(module, _MOVEMENT_MODULES):
                return "movement"
            return "compute"
        target = node.target
        if node.op == "call_method":
            if target in _MOVEMENT_METHODS:
                return "movement"
            if target in _ELEMENTWISE_METHODS or (target in _ARITHMETIC_METHODS and len(self.tensor_inputs(node)) == 1):
                return "elementwise"
            if target in _CLAMP_METHODS and self._constant_bounds(node):
                return "clamp"
            return "compute"
        if target in _CAT_FUNCTIONS:
            return "cat"
        if target in _ELEMENTWISE_FUNCTIONS or (target in _ARITHMETIC and len(self.tensor_inputs(node)) == 1):
            return "elementwise"
        if target in _MOVEMENT_FUNCTIONS:
            return "movement"
        if target in _CLAMP_FUNCTIONS and self._constant_bounds(node):
            return "clamp"
        return "compute"

    def _constant_bounds(self, node: fx.Node) -> bool:
        """A clamp whose bounds are numbers (a tensor bound is elementwise compute)."""
        return len(self.tensor_inputs(node)) == 1 and all(
            _is_scalar(a) for a in list(node.args[1:]) + list(node.kwargs.values()) if not isinstance(a, bool))


# -- the plan: bits per layer -------------------------------------------------------------

def edge_weight_bits(bits: int) -> int:
    """Weight bits as stored: 8-bit weights become 7-bit codes (+-63). Without VNNI, x86's u8 x s8
    kernels (onnxruntime's and others') add pairs of products in int16, which saturates for
    255 x 127 x 2; 255 x 63 x 2 fits (onnxruntime's ``reduce_range`` does the same)."""
    return min(bits, MAX_WEIGHT_BITS)


def weighted_nodes(module: fx.GraphModule) -> list[fx.Node]:
    """Conv2d/Linear calls in execution order."""
    modules = dict(module.named_modules())
    return [node for node in module.graph.nodes
            if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear))]


def graph_plan(model: nn.Module, bits: int, act_bits: int, first_last_bits: int | None = 8,
               exclude: Iterable[str] = ()) -> dict[str, dict]:
    """Per weighted layer {"bits", "act_bits"} (the bits of its input's quantizer); the first and
    last layers *executed* get ``first_last_bits`` (``None``: float); ``exclude`` stays float."""
    layers = [node.target for node in weighted_nodes(trace(model))]
    excluded = set(exclude)
    plan: dict[str, dict] = {GRAPH_KEY: {"act_bits": act_bits}}
    for name in layers:
        if name in excluded:
            continue
        width = first_last_bits if name in (layers[0], layers[-1]) else bits
        if width is not None:
            plan[name] = {"bits": edge_weight_bits(width), "act_bits": act_bits if width == bits else width}
    return plan


# -- the transformation -------------------------------------------------------------------

def quantize_graph(model: nn.Module, plan: dict[str, dict]) -> fx.GraphModule:
    """``model`` traced, with the layers of ``plan`` quantized and tensor quantizers placed.
    Deterministic for a given model and plan, so a checkpoint rebuilds the same module."""
    module = trace(model)
    _quantize_layers(module, plan)
    _place_tensor_quantizers(module, plan, plan[GRAPH_KEY]["act_bits"])
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    module.qtool_plan = plan
    return module


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _quantize_layers(module: fx.GraphModule, plan: dict[str, dict]) -> None:
    """Swap planned Conv2d/Linear for weight-quantized layers, folding a BatchNorm that reads
    the layer's output alone (its statistics still train; eval mode folds it exactly)."""
    modules = dict(module.named_modules())
    for node in weighted_nodes(module):
        spec = plan.get(node.target)
        if spec is None:
            continue
        layer = modules[node.target]
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        quantized = cls.from_float(layer, spec["bits"], act_bits=None)
        quantized.train(layer.training)
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and users[0].args == (node,) and not users[0].kwargs:
            bn = modules[users[0].target]
            if type(bn) in (nn.BatchNorm2d, nn.BatchNorm1d) and bn.num_features == layer.weight.shape[0] \
                    and bn.track_running_stats:
                quantized.fold_batchnorm(bn)
                users[0].replace_all_uses_with(node)
                module.graph.erase_node(users[0])
        _set_module(module, node.target, quantized)


def _place_tensor_quantizers(module: fx.GraphModule, plan: dict[str, dict], default_bits: int) -> None:
    roles = _Roles(module)
    nodes = list(module.graph.nodes)
    role = {node: roles.of(node) for node in nodes}
    quantized_layer = {node for node in nodes if role[node] == "weighted" and node.target in plan}

    def first_input(node: fx.Node) -> fx.Node | None:
        inputs = roles.tensor_inputs(node)
        return inputs[0] if inputs else None

    def region_end(node: fx.Node) -> fx.Node:
        """``node`` followed by the clamps (after an elementwise function: also the further
        elementwise functions) that are each the only reader of the one before."""
        absorbed = ("clamp", "elementwise") if role[node] == "elementwise" else ("clamp",)
        while len(node.users) == 1:
            user = next(iter(node.users))
            if role[user] not in absorbed or first_input(user) is not node:
                break
            node = user
        return node

    def readers(node: fx.Node) -> list[fx.Node]:
        """The ops that consume ``node``'s codes, looking through movement, clamps and cat."""
        found = []
        for user in node.users:
            if role[user] in ("movement", "clamp", "cat"):
                found += readers(user)
            else:
                found.append(user)
        return found

    def needs_codes(end: fx.Node) -> bool:
        return any(role[r] not in ("output", "weighted", "none") or r in quantized_layer for r in readers(end))

    # one slot per region end that is read as codes; movement, clamps and cat pass slots on
    parent: dict[int, int] = {}

    def find(slot: int) -> int:
        while parent[slot] != slot:
            slot = parent[slot]
        return slot

    ends: list[fx.Node] = []
    slot_of: dict[fx.Node, int] = {}
    for node in nodes:
        kind = role[node]
        if kind in ("input", "weighted", "compute", "elementwise"):
            end = region_end(node)
            if needs_codes(end) and end not in slot_of:
                slot_of[end] = parent.setdefault(len(parent), len(parent))
                ends.append(end)
        elif kind in ("movement", "clamp") and first_input(node) in slot_of and node not in slot_of:
            slot_of[node] = slot_of[first_input(node)]
        elif kind == "cat":
            slots = [find(slot_of[arg]) for arg in roles.tensor_inputs(node) if arg in slot_of]
            for slot in slots[1:]:
                parent[slot] = slots[0]
            if slots:
                slot_of[node] = slots[0]

    # bits of a slot: the widest input width of the quantized layers reading it
    bits: dict[int, int] = {}
    for node, slot in slot_of.items():
        for reader in readers(node):
            if reader in quantized_layer and first_input(reader) is node:
                root = find(slot)
                bits[root] = max(bits.get(root, 0), plan[reader.target]["act_bits"])

    container = nn.Module()
    module.add_submodule(ACT_CONTAINER, container)
    quantizer_name: dict[int, str] = {}
    graph = module.graph
    for end in ends:
        root = find(slot_of[end])
        if root not in quantizer_name:
            quantizer_name[root] = f"{ACT_CONTAINER}.{end.name}"
            container.add_module(end.name, LSQQuantizer(bits.get(root, default_bits), signed=None))
        with graph.inserting_after(end):
            quantizer = graph.call_module(quantizer_name[root], (end,))
        end.replace_all_uses_with(quantizer, delete_user_cb=lambda user, q=quantizer: user is not q)

    _pass_input_steps(module, roles)
    _pass_output_steps(module)
    _pass_join_grids(module)


def _pass_output_steps(module: fx.GraphModule) -> None:
    """Give every quantized layer whose output goes (through clamps only) straight into a tensor
    quantizer that quantizer's step (``output_step=``): in eval mode the layer then rounds to
    its codes the way the integer kernel requantizes, with one float multiplier (once that
    quantizer has initialised its step: ``output_ready``)."""
    modules = dict(module.named_modules())
    for node in list(module.graph.nodes):
        if not (node.op == "call_module" and isinstance(modules[node.target], QuantizedLayer)
                and "input_step" in node.kwargs):
            continue
        end = node
        while len(end.users) == 1 and _is_clamp(next(iter(end.users)), modules):
            end = next(iter(end.users))
        users = list(end.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], LSQQuantizer):
            with module.graph.inserting_before(node):
                step = module.graph.get_attr(f"{users[0].target}.scale")
                ready = module.graph.get_attr(f"{users[0].target}.initialized")
            node.kwargs = {**node.kwargs, "output_step": step, "output_ready": ready}


def _is_clamp(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _CLAMP_MODULES)
    return node.op in ("call_function", "call_method") and node.target in _CLAMP_FUNCTIONS | _CLAMP_METHODS


def _code_sources(module: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Node -> the quantizer call whose codes it carries (the quantizer itself, or the ops that
    pass codes through after it)."""
    modules = dict(module.named_modules())
    source: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), LSQQuantizer):
            source[node] = node
        elif _passes_codes(node, modules):
            inputs = [arg for arg in node.all_input_nodes if arg in source]
            if inputs:
                source[node] = source[inputs[0]]
    return source


def _pass_input_steps(module: fx.GraphModule, roles: _Roles) -> None:
    """Give every quantized layer its input quantizer's step (``input_step=``), found by looking
    back through the ops that pass codes through."""
    modules = dict(module.named_modules())
    source = _code_sources(module)
    for node in list(module.graph.nodes):
        if not (node.op == "call_module" and isinstance(modules[node.target], QuantizedLayer)):
            continue
        inputs = [arg for arg in node.all_input_nodes if arg in source]
        if inputs:
            with module.graph.inserting_before(node):
                step = module.graph.get_attr(f"{source[inputs[0]].target}.scale")
            node.kwargs = {**node.kwargs, "input_step": step}


_JOIN_FUNCTIONS = {operator.add: IntegerAdd, operator.iadd: IntegerAdd, torch.add: IntegerAdd,
                   operator.mul: IntegerMul, operator.imul: IntegerMul, torch.mul: IntegerMul}
_JOIN_METHODS = {"add": IntegerAdd, "add_": IntegerAdd, "mul": IntegerMul, "mul_": IntegerMul}


def _pass_join_grids(module: fx.GraphModule) -> None:
    """Replace every add (mul) of two tensors of codes whose result goes (through clamps only)
    into a tensor quantizer by an ``IntegerAdd`` (``IntegerMul``) given the three quantizers'
    steps: in eval mode it computes what the deployed QLinearAdd (QLinearMul) does."""
    modules = dict(module.named_modules())
    source = _code_sources(module)
    graph, container = module.graph, None
    for node in list(graph.nodes):
        join = _JOIN_FUNCTIONS.get(node.target) if node.op == "call_function" else (
            _JOIN_METHODS.get(node.target) if node.op == "call_method" else None)
        if not (join and len(node.args) == 2 and not node.kwargs and all(arg in source for arg in node.args)):
            continue
        end = node
        while len(end.users) == 1 and _is_clamp(next(iter(end.users)), modules):
            end = next(iter(end.users))
        users = list(end.users)
        if not (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], LSQQuantizer)):
            continue
        if container is None:
            container = nn.Module()
            module.add_submodule(JOIN_CONTAINER, container)
        container.add_module(node.name, join())
        quantizers = [source[node.args[0]].target, source[node.args[1]].target, users[0].target]
        with graph.inserting_before(node):
            attrs = {key: tuple(graph.get_attr(f"{q}.{attr}") for q in quantizers)
                     for key, attr in (("steps", "scale"), ("signed", "signed_flag"), ("ready", "initialized"))}
        # the node itself becomes the module call: it keeps its name (reports, fallbacks) and place
        node.op, node.target, node.kwargs = "call_module", f"{JOIN_CONTAINER}.{node.name}", attrs


def _passes_codes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _MOVEMENT_MODULES + _CLAMP_MODULES)
    if node.op == "call_method":
        return node.target in _MOVEMENT_METHODS | _CLAMP_METHODS
    return node.target in _MOVEMENT_FUNCTIONS | _CLAMP_FUNCTIONS | _CAT_FUNCTIONS
