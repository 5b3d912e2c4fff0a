"""PyTorch model -> IR graph: a torch.fx trace whose leaves are the layers adapters know,
run once on calibration data to record every tensor's shape and range.

Why fx and not ``torch.onnx.export``: the exporter must decide where each quantizer goes
(a conv's output takes the *next* layer's input scale so that Conv -> QuantizeLinear fuses),
fold batch norm into per-channel scales, and read integer codes from qtool's and Brevitas'
layers. Building the graph from an fx trace makes each of those one small explicit step;
the TorchScript exporter would need symbolic functions for every custom autograd op and a
rewrite of its output afterwards anyway.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from qtool.exporters.adapters import (
    Context, ExportError, find_function_adapter, find_module_adapter, is_leaf,
)
from qtool.exporters.ir import Graph


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_leaf(module) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    _load_optional_adapters(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.fx cannot trace {type(model).__name__} ({first[:200]}); the exporter needs a "
                          "forward without data-dependent control flow") from None
    return fx.GraphModule(model, graph)


def _load_optional_adapters(model: nn.Module) -> None:
    """Brevitas adapters import brevitas; load them only for a model that uses it."""
    if any(type(module).__module__.startswith("brevitas.") for module in model.modules()):
        import qtool.exporters.brevitas  # noqa: F401  (registers its adapters)


def _is_activation(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _plain(value):
    """A Brevitas QuantTensor carries its float value in ``.value``."""
    return value.value if hasattr(value, "value") and hasattr(value, "scale") else value


class _Recorder(fx.Interpreter):
    """Runs the traced model and keeps, per node, the shape (first batch) and min/max (all batches)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.shapes: dict[str, tuple] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.constants: dict[str, object] = {}
        self.multi: dict[str, int] = {}  # nodes that return several tensors: how many

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        value = _plain(result)
        if node.op == "get_attr":  # a parameter read as a value (a layer's input step): a constant
            self.constants[node.name] = value
        elif _is_activation(value):
            self._record(node.name, value)
        elif isinstance(value, (tuple, list)) and value and all(_is_activation(_plain(v)) for v in value):
            self.multi[node.name] = len(value)  # chunk/split: each piece is a tensor of its own, NAME__i
            for index, piece in enumerate(value):
                self._record(f"{node.name}__{index}", _plain(piece))
        elif node.op != "output":
            self.constants[node.name] = value
        return result

    def _record(self, name: str, value: torch.Tensor) -> None:
        # Recorded before the next node runs: an in-place ReLU later cannot change it.
        self.shapes.setdefault(name, tuple(value.shape[1:]))
        low, high = (float(v) for v in torch.aminmax(value))
        old = self.ranges.get(name, (low, high))
        self.ranges[name] = (min(old[0], low), max(old[1], high))


@torch.no_grad()
def capture(model: nn.Module, calibration: torch.Tensor, batch_size: int = 256) -> Graph:
    """The IR graph of ``model`` (in eval mode), with ranges measured on ``calibration``."""
    module = trace(model)
    recorder = _Recorder(module)
    for start in range(0, len(calibration), batch_size):
        recorder.run(calibration[start:start + batch_size])
    return _translate(module, recorder)


def _translate(module: fx.GraphModule, recorder: _Recorder) -> Graph:
    ops, alias, outputs, graph_input = [], {}, [], None
    tensors = set(recorder.shapes)

    def name_of(node: fx.Node) -> str:
        return alias.get(node.name, node.name)

    def call_args(node: fx.Node) -> tuple[list[str], tuple, dict]:
        inputs = [alias.get(name, name) for name in _tensor_args(node, tensors)]  # in order, repeats kept (x + x)
        resolve = lambda a: (name_of(a) if a.name in tensors else recorder.constants.get(a.name)) if isinstance(a, fx.Node) else a
        return inputs, tuple(fx.node.map_aggregate(node.args, resolve)), dict(fx.node.map_aggregate(node.kwargs, resolve))

    for node in module.graph.nodes:
        if node.op == "placeholder":
            if graph_input is not None:
                raise ExportError(f"the model takes more than one input ({graph_input}, {node.name}); export supports one")
            graph_input = node.name
            continue
        if node.op == "output":
            flat = []
            fx.node.map_arg(node.args[0], flat.append)
            outputs = [name_of(arg) for arg in flat]
            continue
        if _picks_piece(node, recorder.multi):  # chunk(...)[i]: the piece itself, no op
            alias[node.name] = f"{node.args[0].name}__{node.args[1]}"
            tensors.add(node.name)
            recorder.shapes[node.name] = recorder.shapes[alias[node.name]]
            continue
        if node.name not in tensors and node.name not in recorder.multi:
            continue  # x.size(0) and friends: their values are in recorder.constants
        inputs, args, kwargs = call_args(node)
        pieces = recorder.multi.get(node.name, 0)
        output_shape = recorder.shapes[f"{node.name}__0"] if pieces else recorder.shapes[node.name]
        ctx = Context(layer=str(node.target) if node.op == "call_module" else node.name, inputs=inputs,
                      output=node.name, args=args, kwargs=kwargs, output_shape=output_shape, pieces=pieces, target=node.target,
                      input_shapes=tuple(recorder.shapes[name] for name in _tensor_args(node, tensors)))
        new_ops = _adapt(module, node, ctx)
        for op in new_ops:
            if op.output != node.name:
                _describe_intermediate(recorder, op)
        if pieces:
            ops.extend(new_ops)
            continue
        if not any(op.output == node.name for op in new_ops):
            if len(inputs) != 1:
                raise ExportError(f"{ctx.layer}: produced no output")
            alias[node.name] = inputs[0]
        ops.extend(new_ops)

    return Graph(ops=ops, input=graph_input, outputs=outputs, input_shape=recorder.shapes[graph_input],
                 ranges=recorder.ranges, shapes=recorder.shapes)


def _picks_piece(node: fx.Node, multi: dict[str, int]) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[0].name in multi and isinstance(node.args[1], int))


def _tensor_args(node: fx.Node, tensors: set[str]) -> list[str]:
    flat = []
    fx.node.map_arg((node.args, node.kwargs), flat.append)
    return [arg.name for arg in flat if arg.name in tensors]


def _adapt(module: fx.GraphModule, node: fx.Node, ctx: Context):
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
        adapter = find_module_adapter(layer)
        if adapter is None:
            raise ExportError(f"layer {node.target!r} is a {type(layer).__name__}, which the exporter cannot map to ONNX")
        return adapter(layer, ctx)
    if node.op in ("call_function", "call_method"):
        adapter = find_function_adapter(node.target)
        if adapter is None:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            raise ExportError(f"operation {what!r} (node {node.name!r}) cannot be mapped to ONNX by the exporter")
        return adapter(ctx)
    raise ExportError(f"node {node.name!r} ({node.op} {node.target}) cannot be mapped to ONNX: "
                      "the exporter does not read parameters used outside a layer")


# Range of an elementwise op's output, from its input's: what an adapter's intermediate tensors
# (a layer's quantized or binarized input, ReLU before BN) need for shapes and calibration.
_ELEMENTWISE_RANGE = {
    "quant": lambda low, high: (low, high),
    "sign": lambda low, high: (-1.0, 1.0),
    "relu": lambda low, high: (max(low, 0.0), max(high, 0.0)),
}


def _describe_intermediate(recorder: _Recorder, op) -> None:
    source = op.inputs[0] if op.inputs else None
    if op.kind not in _ELEMENTWISE_RANGE or source not in recorder.shapes:
        return
    recorder.shapes.setdefault(op.output, recorder.shapes[source])
    if source in recorder.ranges:
        recorder.ranges.setdefault(op.output, _ELEMENTWISE_RANGE[op.kind](*recorder.ranges[source]))


def calibration_ranges_are_finite(graph: Graph) -> None:
    bad = [name for name, (low, high) in graph.ranges.items() if not (np.isfinite(low) and np.isfinite(high))]
    if bad:
        raise ExportError(f"the model produces non-finite values at {', '.join(bad[:3])} on the calibration data")
