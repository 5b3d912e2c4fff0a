"""scale_parameters(): every learned quantizer scale, for qtool's LSQ layers and for Brevitas."""

import pytest
import torch
from torch import nn

from qtool.models import resnet20
from qtool.quant.lsq import LSQQuantizer
from qtool.quant.prepare import prepare, quantizable_layers
from qtool.quant.scales import execution_order, scale_parameters


def test_qtool_model_lists_weight_and_tensor_scales_of_every_quantizer():
    model = prepare(resnet20(), bits=4, act_bits=4)
    layers = [name for name, _ in quantizable_layers(model)]
    tensors = [f"qtool_act.{name}" for name, _ in model.qtool_act.named_children()]
    scales = scale_parameters(model)

    weights = [(f"{layer}.weight_quantizer", layer) for layer in layers]
    assert sorted((s.quantizer, s.layer) for s in scales) == sorted(weights + [(t, t) for t in tensors])
    assert len(tensors) == 32  # input, 19 conv outputs (after ReLU where there is one), 9 residual sums, ...
    parameters = dict(model.named_parameters())
    for s in scales:
        quantizer = model.get_submodule(s.quantizer)
        assert isinstance(quantizer, LSQQuantizer)
        assert s.parameter is quantizer.scale is parameters[s.name]
        assert s.name == f"{s.quantizer}.scale"
    # per output channel for weights, one value per tensor
    by_name = {s.quantizer: s.parameter for s in scales}
    assert by_name["conv1.weight_quantizer"].shape == (16,) and by_name["qtool_act.x"].shape == (1,)


def test_execution_order_is_network_depth_not_registration_order():
    model = prepare(resnet20(), bits=3, act_bits=3)
    model.train()
    order = execution_order(model, torch.randn(2, 3, 32, 32))
    assert sorted(order) == sorted(s.quantizer for s in scale_parameters(model)) and model.training
    assert order[:4] == ["qtool_act.x", "conv1.weight_quantizer", "qtool_act.relu", "layers.0.0.conv1.weight_quantizer"]
    assert order[-2:] == ["qtool_act.pool", "fc.weight_quantizer"]
    # every block's weights are reached before the next block's, whatever the registration order
    assert order.index("layers.1.0.conv1.weight_quantizer") < order.index("qtool_act.layers_1_0_relu1") \
        < order.index("layers.1.0.conv2.weight_quantizer") < order.index("layers.2.0.conv1.weight_quantizer")
    assert not model.get_submodule("layers.0.0.conv1")._forward_pre_hooks  # the hooks are gone


def test_layer_swapped_model_lists_weight_and_input_scale_of_every_layer():
    model = prepare(resnet20(), bits=4, act_bits=4, placement="layers")
    layers = [name for name, _ in quantizable_layers(model)]
    expected = [(f"{layer}.{role}", layer) for layer in layers for role in ("weight_quantizer", "input_quantizer")]
    assert [(s.quantizer, s.layer) for s in scale_parameters(model)] == expected


def test_float_model_and_frozen_scales_have_nothing_to_list():
    assert scale_parameters(resnet20()) == []
    model = prepare(resnet20(), bits=4)
    model.conv1.weight_quantizer.scale.requires_grad_(False)
    assert "conv1.weight_quantizer" not in [s.quantizer for s in scale_parameters(model)]


def test_standalone_quantizer_is_found():
    model = nn.Sequential(nn.Linear(4, 4), LSQQuantizer(4, signed=None))
    [scale] = scale_parameters(model)
    assert (scale.quantizer, scale.layer, scale.name) == ("1", "", "1.scale")


def brevitas_model() -> nn.Module:
    """Every Brevitas flavour of scale: learned from init, learned after stats init, runtime stats,
    and a non-learned (stats) weight scale that must not be listed."""
    qnn = pytest.importorskip("brevitas.nn")
    return nn.Sequential(
        qnn.QuantIdentity(bit_width=4, return_quant_tensor=False),  # runtime stats -> parameter
        qnn.QuantConv2d(3, 8, 3, padding=1, weight_bit_width=4, weight_scaling_impl_type="parameter",
                        weight_scaling_init=0.05, weight_scaling_per_output_channel=True),
        qnn.QuantReLU(bit_width=4, scaling_impl_type="parameter", max_val=4.0),
        qnn.QuantConv2d(8, 8, 3, padding=1, weight_bit_width=4, weight_scaling_impl_type="parameter_from_stats"),
        qnn.QuantReLU(bit_width=4, scaling_impl_type="parameter", max_val=4.0),
        qnn.QuantConv2d(8, 8, 3, padding=1, weight_bit_width=4),  # default: scale from weight stats, not learned
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        qnn.QuantLinear(8, 10, bias=True, weight_bit_width=4, weight_scaling_impl_type="parameter",
                        weight_scaling_init=0.05),
    )


def test_brevitas_learned_scales_are_found_by_walking_the_model():
    model = brevitas_model()
    scales = scale_parameters(model)
    assert [(s.quantizer, s.layer) for s in scales] == [
        ("0.act_quant", "0"), ("1.weight_quant", "1"), ("2.act_quant", "2"),
        ("3.weight_quant", "3"), ("4.act_quant", "4"), ("8.weight_quant", "8"),
    ]
    parameters = dict(model.named_parameters())
    for s in scales:
        assert s.parameter is parameters[s.name]
        assert s.name.startswith(s.quantizer + ".") and s.name.endswith(".value")
    assert scales[1].parameter.numel() == 8  # per output channel
    # the listed parameters are exactly the scales: weights and biases are not among them
    listed = {id(s.parameter) for s in scales}
    assert not any(id(model[i].weight) in listed for i in (1, 3, 5, 8))


def test_brevitas_scales_receive_gradients():
    model = brevitas_model()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {s.quantizer: s.parameter.grad for s in scale_parameters(model)}
    assert grads["1.weight_quant"] is not None and grads["1.weight_quant"].abs().sum() > 0
    assert grads["2.act_quant"] is not None and grads["2.act_quant"].abs().sum() > 0
