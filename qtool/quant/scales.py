"""Every learned quantizer scale of a model, by quantizer and layer name.

GAQAT (and any analysis of scale gradients) needs the step-size parameters of a model without
knowing how the model was quantized. Two families are recognised by walking the modules:

- qtool's ``LSQQuantizer`` (the ``weight_quantizer``/``input_quantizer`` of QuantConv2d and
  QuantLinear, a graph-placed tensor quantizer under ``qtool_act``, or one used on its own):
  its ``scale`` parameter.
- Brevitas scaling implementations that learn their scale (``ParameterScaling``,
  ``ParameterFromStatsFromParameterScaling``, ``ParameterFromRuntimeStatsScaling`` and any
  other module of ``brevitas.core.scaling`` holding a trainable parameter). The quantizer is the
  nearest enclosing Brevitas quant proxy (``weight_quant``, ``act_quant``, ``input_quant``...),
  the layer is the module owning that proxy.

Brevitas is only consulted when the model's code already imported it, so qtool models never pay
for importing Brevitas.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qtool.quant.graph import ACT_CONTAINER
from qtool.quant.lsq import LSQQuantizer


@dataclass(frozen=True)
class ScaleParameter:
    """One learned scale tensor (one value per tensor, or one per output channel)."""

    quantizer: str  # module path of the quantizer, e.g. "layers.0.0.conv1.weight_quantizer"
    layer: str  # module path of the layer it quantizes, e.g. "layers.0.0.conv1"
    name: str  # the parameter's name in model.named_parameters()
    parameter: nn.Parameter


def scale_parameters(model: nn.Module) -> list[ScaleParameter]:
    """Trainable quantizer scales of ``model`` in module registration order."""
    names = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    found: list[ScaleParameter] = []
    for path, module in modules.items():
        if isinstance(module, LSQQuantizer):
            # a graph-placed tensor quantizer is a "layer" of its own (it belongs to no weighted layer)
            layer = path if path.startswith(f"{ACT_CONTAINER}.") else _parent(path)
            found.append(ScaleParameter(path, layer, names[id(module.scale)], module.scale))
        elif _is_brevitas_scaling(module):
            quantizer = _brevitas_quantizer_path(path, modules)
            for parameter in module.parameters(recurse=False):
                if id(parameter) in names:
                    found.append(ScaleParameter(quantizer, _parent(quantizer), names[id(parameter)], parameter))
    return [s for s in found if s.parameter.requires_grad]


def watch_execution_order(model: nn.Module) -> tuple[list[str], Callable[[], None]]:
    """A list that the next forward pass of ``model`` fills with the quantizer paths of
    ``scale_parameters(model)`` in the order it reaches them (network depth, which registration
    order is not: a graph-prepared model registers every tensor quantizer after all the layers),
    and the function that removes the hooks doing it. A weight quantizer is reached with its layer;
    a quantizer the pass never reaches is left out."""
    modules = dict(model.named_modules())
    order: list[str] = []
    hooks = [modules[s.quantizer if s.layer == s.quantizer else s.layer].register_forward_pre_hook(
                 lambda module, args, name=s.quantizer: None if name in order else order.append(name))
             for s in scale_parameters(model)]

    def remove() -> None:
        for hook in hooks:
            hook.remove()

    return order, remove


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """``watch_execution_order`` for one eval-mode forward pass of ``example``."""
    order, remove = watch_execution_order(model)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(training)
        remove()
    return order


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _is_brevitas_scaling(module: nn.Module) -> bool:
    return "brevitas" in sys.modules and type(module).__module__.startswith("brevitas.core.scaling")


def _brevitas_quantizer_path(path: str, modules: dict[str, nn.Module]) -> str:
    """The nearest ancestor that is a Brevitas quant proxy; the scaling module itself otherwise."""
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    ancestor = path
    while ancestor:
        ancestor = _parent(ancestor)
        if isinstance(modules.get(ancestor), QuantProxyFromInjector):
            return ancestor
    return path
