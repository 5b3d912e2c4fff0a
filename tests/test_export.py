"""The ONNX exporter: onnxruntime runs every quantized layer as an integer kernel, computes the
trained model's numbers, batch norm folds exactly, Brevitas models export the same way, INT4
storage halves the file, and user mistakes are one-line errors that leave no file behind."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.exporters import export
from qtool.exporters.adapters import ExportError, batchnorm, Context
from qtool.exporters.bounds import saturating_kernels
from qtool.exporters.ir import Graph, Op, Weights
from qtool.exporters.passes import fold_batchnorm
from qtool.exporters.verify import VerificationError, compare
from qtool.models import build_model
from qtool.onnxrt import create_session, float_layers, optimized_census
from qtool.quant.integer import integer_layer
from qtool.quant.prepare import prepare

from tiny_models import BrevitasResidualNet, DepthwiseResidualNet, as_inputs, synthetic_domains, trained_w4a4, write_factory


@pytest.fixture(scope="module")
def data():
    return synthetic_domains()


@pytest.fixture(scope="module")
def trained(data):
    return trained_w4a4(data)


def held_out(data):
    return as_inputs(data["b_x"]), torch.from_numpy(data["b_y"])


def calibration(data):
    return as_inputs(data["a_x"][:128])


def initialized(model: nn.Module, shape=(3, 32, 32)) -> nn.Module:
    """A prepared model whose quantizers have seen one batch (scales initialized), in eval mode."""
    torch.manual_seed(0)
    model(torch.randn(4, *shape))
    return model.eval()


def count(census: dict, *ops: str) -> int:
    return sum(census.get(op, 0) for op in ops)


# -- the fused format -----------------------------------------------------------------------

def test_custom_model_runs_fully_fused_and_reproduces_pytorch(trained, data, tmp_path):
    images, labels = held_out(data)
    result = export(trained, images[:1], tmp_path / "tiny.onnx", calibration=calibration(data), verify=images,
                    labels=labels)
    onnx.checker.check_model(onnx.load(tmp_path / "tiny.onnx"), full_check=True)
    ops = result.ops
    # stem, expand, depthwise, project, down: five QLinearConv, the residual join a QLinearAdd, the head QGemm
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    assert float_layers(ops) == {} and "ConvInteger" not in ops and "Add" not in ops
    assert "BatchNormalization" not in ops
    assert result.notes == []  # every integer tensor is one the trained model quantizes: nothing approximated
    check = result.verification
    assert check.passed and check.agreement >= 0.995 and check.within_step >= 0.995
    assert check.torch_accuracy > 0.5 and abs(check.onnx_accuracy - check.torch_accuracy) <= 0.01


@pytest.fixture(scope="module")
def layer_swapped(data):
    """The fallback placement (each layer quantizes its own input), as for a model fx cannot trace."""
    return trained_w4a4(data, placement="layers")


def test_layer_swapped_model_exports_exactly_with_float_residuals(layer_swapped, data, tmp_path):
    images, labels = held_out(data)
    result = export(layer_swapped, images[:1], tmp_path / "exact.onnx", calibration=calibration(data),
                    verify=images, labels=labels)
    # the residual sum and the biases stay float, as trained: nothing approximated, at ConvInteger's cost
    assert "QLinearAdd" not in result.ops and result.ops["ConvInteger"] >= 4 and result.notes == []
    assert result.verification.passed


def test_fast_numerics_fuses_the_residual_add_and_reports_the_approximation(layer_swapped, data, tmp_path):
    images, labels = held_out(data)
    result = export(layer_swapped, images[:1], tmp_path / "fast.onnx", calibration=calibration(data), numerics="fast")
    assert result.ops["QLinearConv"] == 5 and result.ops["QLinearAdd"] == 1 and result.ops["QGemm"] == 1
    assert float_layers(result.ops) == {} and "Add" not in result.ops
    assert any("QLinearAdd" in note for note in result.notes)  # the float residual sum became 8-bit
    check = compare(layer_swapped, str(tmp_path / "fast.onnx"), images, labels)
    assert check.agreement >= 0.95  # approximate, not exact: why this is no longer the default
    assert check.onnx_accuracy >= check.torch_accuracy - 0.02


@pytest.mark.parametrize("arch, convs, adds", [("resnet20", 21, 9), ("mobilenetv2", 52, 10)])
def test_zoo_models_fuse_every_layer(arch, convs, adds, tmp_path):
    model = initialized(prepare(build_model(arch), bits=4, act_bits=4))
    result = export(model, torch.randn(1, 3, 32, 32), tmp_path / f"{arch}.onnx", calibration=torch.randn(8, 3, 32, 32))
    assert result.quantized_layers == convs + 1 and result.float_layers == 0
    assert result.ops["QLinearConv"] == convs and result.ops["QLinearAdd"] == adds and result.ops["QGemm"] == 1
    assert float_layers(result.ops) == {} and result.notes == []
    # mobilenetv2's ReLU6 becomes integer bounds, not a float Clip: every Clip runs on uint8 codes
    model_proto = onnx.load(tmp_path / f"{arch}.onnx")
    assert saturating_kernels(model_proto) == []  # exact on x86 without VNNI too
    clip_types = {init.data_type for init in model_proto.graph.initializer if init.name.startswith("clip_")}
    assert clip_types <= {onnx.TensorProto.UINT8}


def test_layers_the_plan_leaves_in_float_export_as_float_ops(tmp_path):
    model = initialized(prepare(build_model("resnet20"), bits=4, act_bits=4, first_last_bits=None))
    result = export(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", calibration=torch.randn(8, 3, 32, 32))
    assert result.float_layers == 2 and result.quantized_layers == 20
    assert count(result.ops, "QLinearConv") == 20
    assert count(result.ops, "Conv", "FusedConv") == 1 and count(result.ops, "Gemm") == 1


# -- batch norm folding -----------------------------------------------------------------------

def test_batchnorm_folds_exactly_into_scales_and_bias_even_with_negative_gamma():
    torch.manual_seed(0)
    conv = prepare(nn.Sequential(nn.Conv2d(4, 6, 3)), bits=4, first_last_bits=4, placement="layers")[0]
    conv(torch.randn(8, 4, 9, 9))
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 2.0, -3.0, 0.2]))
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    view = integer_layer(conv)
    weights = Weights(view.codes.numpy(), view.weight_step.numpy(), view.lo, view.hi)
    layer = Op("conv", ["x"], "y", "conv", {"weights": weights, "bias": None})
    bn_op = batchnorm(bn, Context("bn", ["y"], "z"))[0]
    graph = Graph([layer, bn_op], "x", ["z"], (4, 9, 9), {}, {})
    fold_batchnorm(graph)
    assert [op.kind for op in graph.ops] == ["conv"] and graph.ops[0].output == "z"
    folded = graph.ops[0].attrs["weights"]
    assert np.all(folded.scale > 0) and folded.codes.min() >= -7 and folded.codes.max() <= 7
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    expected = bn.double()(nn.functional.conv2d(x, torch.from_numpy(weights.dequantized())))
    got = nn.functional.conv2d(x, torch.from_numpy(folded.dequantized()),
                               torch.from_numpy(graph.ops[0].attrs["bias"]))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# -- Brevitas --------------------------------------------------------------------------------

def test_brevitas_model_with_a_quantized_join_exports_fully_fused_and_faithful_exactly(data, tmp_path):
    from tiny_models import train

    torch.manual_seed(1)  # a model whose fast export is beyond one step on 7 of 384 images (AMD EPYC, AVX2)
    model = BrevitasResidualNet()
    images = as_inputs(np.concatenate([data["a_x"], data["b_x"]]))
    labels = torch.from_numpy(np.concatenate([data["a_y"], data["b_y"]])).long()
    train(model, images, labels, steps=25)  # also collects Brevitas' activation statistics
    test_images, test_labels = held_out(data)
    result = export(model, test_images[:1], tmp_path / "brevitas.onnx", calibration=calibration(data), numerics="fast")
    # the 8-bit head (8-bit weights on 8-bit inputs) would saturate x86's u8 x s8 pair sums without
    # VNNI: it runs as u8 x u8 MatMulInteger instead, exact on every CPU
    assert result.ops["QLinearConv"] == 4 and result.ops["QLinearAdd"] == 1 and result.ops["MatMulInteger"] == 1
    assert float_layers(result.ops) == {} and "ConvInteger" not in result.ops
    assert saturating_kernels(onnx.load(tmp_path / "brevitas.onnx")) == []
    # every tensor is on one of the model's own grids, but batch norm's shift is a float bias in
    # Brevitas: fast rounds it to int32 inside QLinearConv, and says so for each of the 4 convs
    assert len(result.notes) == 4 and all("float bias" in note for note in result.notes)
    fast = compare(model.eval(), tmp_path / "brevitas.onnx", test_images, noise_floor=False)
    assert fast.agreement >= 0.99 and fast.max_abs_diff <= 3 * fast.output_step  # close, not exact
    assert fast.within_step < 0.995  # so --verify refuses it: this is what faithful is for
    with pytest.raises(VerificationError, match="--numerics faithful keeps them exact"):
        export(model, test_images[:1], tmp_path / "refused.onnx", calibration=calibration(data), verify=test_images,
               numerics="fast")
    assert not (tmp_path / "refused.onnx").exists()
    # faithful keeps batch norm's shift a float bias: ConvInteger for the biased convs, PyTorch's numbers
    faithful = export(model, test_images[:1], tmp_path / "faithful.onnx", calibration=calibration(data),
                      verify=test_images, labels=test_labels, numerics="faithful")
    assert faithful.ops["ConvInteger"] == 4 and float_layers(faithful.ops) == {} and faithful.notes == []
    assert faithful.verification.passed and faithful.verification.agreement == 1.0
    assert faithful.verification.max_abs_diff <= faithful.verification.output_step


# -- INT4 storage ----------------------------------------------------------------------------

def test_int4_storage_halves_the_weights_and_computes_the_same_logits(trained, data, tmp_path):
    images, _ = held_out(data)
    kwargs = dict(calibration=calibration(data), numerics="fast")
    int8 = export(trained, images[:1], tmp_path / "w8.onnx", **kwargs)
    int4 = export(trained, images[:1], tmp_path / "w4.onnx", weight_storage="int4", **kwargs)
    packed = [t for t in onnx.load(tmp_path / "w4.onnx").graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(packed) == 4  # the three 4-bit convs of the block and the strided conv; stem/head stay 8-bit
    assert all(len(t.raw_data) == (np.prod(t.dims) + 1) // 2 for t in packed)  # two codes per byte
    assert int4.opset >= 21 and int4.bytes < int8.bytes  # this model is tiny: node overhead is most of it
    assert int4.ops["QLinearConv"] == int8.ops["QLinearConv"] == 5  # onnxruntime unpacks them at load
    feed = images.numpy()
    run = lambda path: create_session(path).run(None, {"input": feed})[0]
    np.testing.assert_array_equal(run(tmp_path / "w4.onnx"), run(tmp_path / "w8.onnx"))


# -- verification, errors --------------------------------------------------------------------

def test_verification_failure_says_by_how_much_and_writes_nothing(trained, data, tmp_path, monkeypatch):
    from qtool.exporters import onnx_graph

    original = onnx_graph.OnnxBuilder.weight

    def tampered(self, op, weights, multiplier):  # flip the sign of the head's weights
        if op.kind == "linear":
            weights = type(weights)(-weights.codes, weights.scale, weights.lo, weights.hi)
        return original(self, op, weights, multiplier)

    monkeypatch.setattr(onnx_graph.OnnxBuilder, "weight", tampered)
    images, labels = held_out(data)
    with pytest.raises(VerificationError, match=r"top-1 agreement \d+\.\d+% .* within one output step"):
        export(trained, images[:1], tmp_path / "bad.onnx", calibration=calibration(data), verify=images)
    assert not (tmp_path / "bad.onnx").exists() and os.listdir(tmp_path) == []


def test_an_operator_without_onnx_mapping_names_the_layer_and_the_op(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ExportError, match=r"layer '1' is a Softplus"):
        export(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_output_path_mistakes_are_one_line_errors(tmp_path):
    model = initialized(prepare(DepthwiseResidualNet(), bits=4), shape=(3, 16, 16))
    example = torch.randn(1, 3, 16, 16)
    with pytest.raises(QtoolError, match="is a directory"):
        export(model, example, tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(QtoolError, match="cannot write"):
        export(model, example, tmp_path / "a_file" / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(QtoolError, match="cannot write"):
            export(model, example, locked / "m.onnx")
    finally:
        locked.chmod(0o700)
    assert os.listdir(locked) == []


# -- the command line --------------------------------------------------------------------------

def test_cli_exports_a_model_built_by_a_function_and_verifies_it(trained, data, tmp_path, run_cli, monkeypatch):
    np.savez(tmp_path / "synthetic.npz", **data)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    source = write_factory(tmp_path)
    code, out, err = run_cli("export", f"{source}:build", "--weights", tmp_path / "weights.pt", "--input-shape", "3,28,28",
                             "--data", tmp_path / "synthetic.npz", "--target-domain", "b", "--verify", "200",
                             "--numerics", "faithful", "-o", tmp_path / "out.onnx", "--json", tmp_path / "report.json")
    assert code == 0, err
    assert "QLinearConv" in out and "ConvInteger" not in out and "verified on b" in out
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["samples"] == 200


def test_cli_export_of_a_checkpoint_and_its_errors(run_cli, digits_small, tmp_path):
    from qtool.checkpoint import save_checkpoint

    model = initialized(prepare(build_model("resnet20"), bits=4, act_bits=4))
    save_checkpoint(tmp_path / "model.pt", model, "resnet20", 10, 3, 32, {})
    code, out, err = run_cli("export", tmp_path / "model.pt", "-o", tmp_path / "m.onnx", "--data", digits_small,
                             "--calibration", "8")
    assert code == 0, err
    assert optimized_census((tmp_path / "m.onnx").read_bytes())["QLinearConv"] == 21
    code, _, err = run_cli("export", tmp_path / "model.pt", "-o", tmp_path, "--data", digits_small)
    assert code == 2 and err.startswith("error: ") and "is a directory" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("export", tmp_path / "missing.pt", "-o", tmp_path / "x.onnx", "--data", digits_small)
    assert code == 2 and "not found" in err
    code, _, err = run_cli("export", tmp_path / "model.pt", "-o", tmp_path / "x.onnx", "--weight-storage", "int4",
                           "--opset", "17", "--data", digits_small)
    assert code == 2 and "opset 17" in err and not (tmp_path / "x.onnx").exists()


# -- a new layer family plugs in through one adapter -------------------------------------------

class SignConv2d(nn.Conv2d):
    """A stand-in for a binary layer: sign(x) (sign(0) = +1) convolved with sign(w) * mean|w|."""

    def forward(self, x):
        ones = torch.ones_like(x)
        scale = self.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(torch.where(x >= 0, ones, -ones), torch.sign(self.weight) * scale, self.bias)


def test_a_binary_layer_adapter_exports_to_integer_kernels(tmp_path, monkeypatch):
    from qtool.exporters import adapters
    from qtool.exporters.ir import Weights

    def sign_conv(layer, ctx):
        signs = ctx.tensor("sign")
        codes = torch.where(layer.weight >= 0, 1, -1).to(torch.int32).numpy()
        scale = layer.weight.detach().abs().mean(dim=(1, 2, 3)).double().numpy()
        return [Op("sign", ctx.inputs, signs, ctx.layer, {"scale": 1.0}),
                adapters.weighted_op(layer, ctx, [signs], Weights(codes, scale, -1, 1), adapters.float_array(layer.bias))]

    monkeypatch.setattr(adapters, "_MODULES", list(adapters._MODULES))  # registration stays local to this test
    adapters.module_adapter(SignConv2d)(sign_conv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), SignConv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model(torch.randn(8, 3, 12, 12))
    model.eval()
    images = torch.randn(64, 3, 12, 12)
    result = export(model, images[:1], tmp_path / "binary.onnx", calibration=images, verify=images,
                    numerics="faithful")
    # its output is float in PyTorch (BN, ReLU, pooling follow), so faithful numerics keeps the int32
    # accumulator: ConvInteger; the float stem and head stay float
    assert result.quantized_layers == 1 and result.ops["ConvInteger"] == 1 and result.ops["Where"] == 1
    assert result.verification.agreement == 1.0 and result.verification.within_step == 1.0
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "binary.onnx").graph.initializer
               if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 4]
    assert len(weights) == 1 and set(np.unique(weights[0])) == {127, 129}  # ±1 around ConvInteger's zero point 128


def test_a_qtool_binary_network_exports_to_integer_kernels_with_exact_signs(tmp_path, capsys):
    from qtool.quant.binarize import prepare_binary
    from qtool.quant.binary import binary_layers

    torch.manual_seed(0)
    model = prepare_binary(build_model("resnet20", 10, 3))
    model.train()
    for _ in range(2):
        model(torch.randn(16, 3, 32, 32))  # BatchNorm statistics
    model.eval()
    images = torch.randn(32, 3, 32, 32)
    result = export(model, images[:1], tmp_path / "binary.onnx", calibration=images, verify=images, numerics="fast")
    convs = len(binary_layers(model))
    # every binary conv is a ConvInteger on {-1, +1} codes; fast numerics gives way to exact signs
    assert result.quantized_layers == convs == result.ops["ConvInteger"] and result.ops["Where"] == convs
    assert result.numerics == "faithful" and "binary layers need exact signs" in result.numerics_note
    from qtool.progress import print_export_summary

    print_export_summary(result, None)  # what `qtool export` prints: the switch is said, not silent
    import re

    assert "binary layers need exact signs" in re.sub(r"[│|\s]+", " ", capsys.readouterr().out)
    assert result.verification.agreement == 1.0 and result.verification.within_step == 1.0
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "binary.onnx").graph.initializer
               if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 4]
    assert len(weights) == convs and all(set(np.unique(w)) <= {127, 129} for w in weights)


def test_the_within_step_bar_is_never_stricter_than_pytorch_against_itself():
    from qtool.exporters.verify import Verification

    def check(within, floor, agreement=1.0):
        return Verification(1000, agreement, within, 0.1, 0.04, agreement, 0.1, float64_agreement=1.0,
                            float64_within_step=floor).passed

    assert check(0.996, None) and not check(0.99, None)        # 99.5 % when the noise floor is unknown
    assert check(0.985, 0.982) and not check(0.975, 0.982)     # else PyTorch float64 vs float32 sets it
    assert check(0.981, 0.5) and not check(0.975, 0.5)         # ...but never below the 98 % floor
    assert not check(0.999, 0.999, agreement=0.99)              # top-1 stays at 99.5 % whatever the floor
