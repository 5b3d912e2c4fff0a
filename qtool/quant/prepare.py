"""``qtool.prepare``: put LSQ quantizers into any ``nn.Module``.

Two placements, both described by a *plan* (layer name -> weight and activation bits) so that a
checkpoint can store the plan and rebuild exactly the same model later:

- on the traced graph (``qtool.quant.graph``, the default): a quantizer on every tensor the
  deployed integer graph holds, so that the export reproduces the trained model;
- the layer swap (the fallback for models torch.fx cannot trace): every Conv2d/Linear quantizes
  its own input; the exporter then approximates residual sums and other float tensors.
"""

from __future__ import annotations

import copy
import sys
from typing import Iterable

from torch import nn

from qtool.quant.binary import build_plan_entry
from qtool.quant.graph import GRAPH_KEY, GraphTraceError, edge_weight_bits, graph_plan, quantize_graph
from qtool.quant.layers import QuantConv2d, QuantLinear, QuantizedLayer

Plan = dict[str, dict]  # layer name -> {"bits": w, "act_bits": a} (LSQ) or {"kind": ...} (qtool.quant.binary)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers in registration order (the order the forward pass uses them
    in every zoo model and in most hand-written ones)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def make_plan(
    model: nn.Module,
    bits: int,
    act_bits: int | None = None,
    first_last_bits: int | None = 8,
    exclude: Iterable[str] = (),
) -> Plan:
    """Which layer gets how many bits.

    The first layer sees the raw image and the last produces the logits; both are the most
    sensitive, so by default they stay at ``first_last_bits`` (8). ``None`` keeps them in float.
    Layers named in ``exclude`` stay in float.
    """
    act_bits = bits if act_bits is None else act_bits
    layers = [name for name, _ in quantizable_layers(model) if name not in set(exclude)]
    plan: Plan = {name: {"bits": edge_weight_bits(bits), "act_bits": act_bits} for name in layers}
    all_layers = [name for name, _ in quantizable_layers(model)]
    for edge in {all_layers[0], all_layers[-1]} if all_layers else ():
        if edge not in plan:
            continue
        if first_last_bits is None:
            del plan[edge]
        else:
            plan[edge] = {"bits": edge_weight_bits(first_last_bits), "act_bits": first_last_bits}
    return plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """The quantized model: a new ``GraphModule`` for a graph plan; otherwise ``model`` itself,
    every layer named in ``plan`` replaced in place by its quantized version.

    An entry with a ``kind`` (binary convs and the block rewiring binary networks need) is
    built by ``qtool.quant.binary``; every other entry is an LSQ layer."""
    if GRAPH_KEY in plan:
        return quantize_graph(model, plan)
    modules = dict(model.named_modules())
    for name, spec in plan.items():
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"layer {name!r} of the quantization plan is not in the model")
        if "kind" in spec:
            replacement = build_plan_entry(layer, spec)
            replacement.train(layer.training)
            _set_submodule(model, name, replacement)
            continue
        if isinstance(layer, QuantizedLayer):
            continue
        if isinstance(layer, nn.Conv2d):
            quantized = QuantConv2d.from_float(layer, spec["bits"], spec["act_bits"])
        elif isinstance(layer, nn.Linear):
            quantized = QuantLinear.from_float(layer, spec["bits"], spec["act_bits"])
        else:
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; only Conv2d and Linear quantize")
        quantized.train(layer.training)
        _set_submodule(model, name, quantized)
    return model


def prepare(
    model: nn.Module,
    bits: int = 4,
    act_bits: int | None = None,
    first_last_bits: int | None = 8,
    exclude: Iterable[str] = (),
    inplace: bool = False,
    placement: str = "graph",
) -> nn.Module:
    """Return ``model`` with LSQ fake quantization.

    Weights are quantized per output channel (signed, narrow grid), activations per tensor
    (unsigned when they are non-negative on the first batch, as after a ReLU). ``placement="graph"``
    traces the model and quantizes every tensor the deployed integer graph holds (the result is
    a ``torch.fx.GraphModule`` sharing ``model``'s layers); a model torch.fx cannot trace falls
    back, with one notice line, to ``"layers"``: each Conv2d/Linear quantizes its own input.
    Step sizes are initialised on the first forward pass, so run one batch of real data (or
    train) before exporting. ``inplace=False`` works on a deep copy.
    """
    if placement not in ("graph", "layers"):
        raise ValueError(f"placement must be 'graph' or 'layers', got {placement!r}")
    if not inplace:
        model = copy.deepcopy(model)
    act_bits = bits if act_bits is None else act_bits
    if placement == "graph":
        try:
            return quantize_graph(model, graph_plan(model, bits, act_bits, first_last_bits, exclude))
        except GraphTraceError as exc:
            print(f"qtool: torch.fx cannot trace {type(model).__name__} ({exc}); quantizing layer inputs only, "
                  "so export will approximate residual sums and other float tensors on calibrated 8-bit grids",
                  file=sys.stderr)
    plan = make_plan(model, bits, act_bits, first_last_bits, exclude)
    apply_plan(model, plan)
    model.qtool_plan = plan  # read by the checkpoint writer
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
