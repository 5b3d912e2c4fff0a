"""Binary networks: the sign/STE/ReSTE estimators, the binary conv, prepare_binary's rewiring,
the o schedule and indicators, checkpoints, and `qtool quantize --bits 1` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qtool.checkpoint import load_model, save_checkpoint
from qtool.data import Domain, Split
from qtool.errors import QtoolError
from qtool.models import build_model
from qtool.quant.binarize import prepare_binary
from qtool.quant.binary import BinaryConv2d, BinaryEstimator, BiRealBlock, ReLUBatchNorm2d, binary_layers
from qtool.quant.binary_layouts import LAYOUTS, register_binary_layout
from qtool.quant.sign_estimator import binary_sign, power_function
from qtool.quant.layers import QuantConv2d, QuantLinear
from qtool.train.binary import EstimatorSchedule, estimating_error, gradient_stability, o_schedule
from qtool.train.trainer import TrainConfig, Trainer

T, M = 1.5, 0.1


def estimator_grad(z: torch.Tensor, estimator: BinaryEstimator) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    estimator(z).sum().backward()
    return z.grad


# -- estimators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("o", [1.0, 1.5, 2.0, 3.0])
def test_reste_backward_matches_finite_differences_of_the_power_function(o):
    magnitudes = torch.tensor([0.1, 0.13, 0.4, 0.77, 1.0, 1.2, 1.5], dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes])
    h = 1e-6
    numeric = (power_function(z + h, o) - power_function(z - h, o)) / (2 * h)
    got = estimator_grad(z, BinaryEstimator("reste", o=o, t=T, m=M))
    torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0])
def test_reste_gradient_is_zero_beyond_t_and_the_secant_slope_below_m(o):
    outside = torch.tensor([1.5001, -1.6, 2.0, -30.0])
    assert torch.equal(estimator_grad(outside, BinaryEstimator("reste", o=o)), torch.zeros(4))
    below = torch.tensor([0.0, -0.0, 1e-8, -0.05, 0.0999])
    slope = M ** ((1 - o) / o)
    assert slope == pytest.approx((M ** (1 / o)) / M)  # f(m)/m, the secant from 0 to m
    torch.testing.assert_close(estimator_grad(below, BinaryEstimator("reste", o=o)), torch.full((5,), slope))


def test_ste_gradient_is_the_clipped_identity():
    z = torch.tensor([-3.0, -1.0001, -1.0, -0.3, 0.0, 0.999, 1.0, 1.2])
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    assert torch.equal(estimator_grad(z, BinaryEstimator("ste")), expected)
    # The STE ignores ReSTE's o: same gradient whatever o the schedule would set.
    assert torch.equal(estimator_grad(z, BinaryEstimator("ste", o=3.0)), expected)


def test_sign_maps_zero_to_plus_one_in_the_forward_of_every_path():
    z = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0, -2.0])
    expected = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    assert torch.equal(binary_sign(z), expected)  # inference path
    assert torch.equal(BinaryEstimator("reste")(z.clone().requires_grad_()), expected)  # training (fused) path
    assert torch.equal(BinaryEstimator("ste")(z.double().requires_grad_()), expected.double())  # float64 reference


# -- the binary conv ----------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_binary_conv_uses_only_plus_minus_scale_weights_and_signed_inputs(per_channel):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, padding=1, bias=False, per_channel=per_channel)
    x = torch.randn(2, 4, 7, 7)
    scale = conv.weight_scale()
    assert scale.shape == ((6,) if per_channel else (1,))
    expected_scale = conv.weight.abs().mean(dim=(1, 2, 3)) if per_channel else conv.weight.abs().mean().reshape(1)
    torch.testing.assert_close(scale, expected_scale)
    codes = conv.binary_weight()
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 1}
    effective = codes.float() * scale.reshape(-1, 1, 1, 1)
    assert len(effective.reshape(6, -1)[0].abs().unique()) == 1  # one magnitude per output channel
    expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), effective, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_binary_conv_zero_pads_the_binarized_input():
    conv = BinaryConv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)  # sign +1, scale 0.5
    out = conv(torch.full((1, 1, 3, 3), -2.0))  # every input binarizes to -1
    # Each output sums -1 * 0.5 over its taps inside the image; padded taps add 0, not +-0.5.
    expected = -0.5 * torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])
    assert torch.equal(out[0, 0], expected)


def test_prepare_binary_keeps_first_conv_downsample_and_classifier_and_rewires_blocks():
    model = prepare_binary(build_model("resnet20"))
    names = [name for name, _ in binary_layers(model)]
    assert len(names) == 18 and "conv1" not in names and not any("downsample" in n for n in names)
    assert type(model.conv1) is torch.nn.Conv2d and type(model.fc) is torch.nn.Linear
    assert type(model.layers[1][0].downsample[0]) is torch.nn.Conv2d
    assert all(isinstance(block, BiRealBlock) for stage in model.layers for block in stage)
    assert isinstance(model.relu, torch.nn.Identity)  # the stem is conv -> ReLU -> BN now

    eight_bit = prepare_binary(build_model("resnet20"), keep_bits=8)
    assert isinstance(eight_bit.conv1, QuantConv2d) and eight_bit.conv1.bits == 8
    assert isinstance(eight_bit.fc, QuantLinear) and isinstance(eight_bit.layers[1][0].downsample[0], QuantConv2d)


def test_bireal_block_adds_a_real_shortcut_around_each_binary_conv():
    torch.manual_seed(0)
    model = prepare_binary(build_model("resnet20")).eval()
    block = model.layers[0][0]
    x = torch.randn(2, 16, 8, 8)
    hidden = block.bn1(F.relu(block.conv1(x))) + x
    torch.testing.assert_close(block(x), block.bn2(F.relu(block.conv2(hidden))) + hidden)


@pytest.mark.parametrize("arch", ["resnet18", "vgg-small"])
def test_every_binary_conv_sees_signed_inputs(arch):
    """After the rewiring no binary conv gets a ReLU output (which would binarize to all +1).
    Train mode: BN re-centres with batch statistics (fresh running statistics are the identity)."""
    torch.manual_seed(0)
    model = prepare_binary(build_model(arch)).train()
    seen = []
    for _, layer in binary_layers(model):
        layer.register_forward_pre_hook(lambda module, args: seen.append(float((args[0] < 0).float().mean())))
    model(torch.randn(4, 3, 32, 32))
    assert len(seen) == len(binary_layers(model)) and min(seen) > 0.05


def test_binary_options_are_checked_with_one_line_errors():
    model = build_model("resnet20")
    with pytest.raises(QtoolError, match="unknown reste option"):
        prepare_binary(model, o_ned=3)
    with pytest.raises(QtoolError, match="ste"):
        prepare_binary(model, estimator="ste", o_end=2)
    with pytest.raises(QtoolError, match="0 < m < t"):
        prepare_binary(model, m=2.0)
    with pytest.raises(QtoolError, match="supports"):
        prepare_binary(build_model("mobilenetv2"))


class SignedNet(torch.nn.Module):
    """A family the zoo does not have: conv -> ReLU -> BN blocks, rewired by its own layout."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(8)
        self.body, self.head = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(self.bn(self.relu(self.stem(x)))).mean((2, 3)))


def test_a_registered_layout_makes_a_new_model_class_binarizable():
    with pytest.raises(QtoolError, match="register_binary_layout"):
        prepare_binary(SignedNet())
    register_binary_layout(SignedNet)(lambda model: {"relu": {"kind": "identity"}, "bn": {"kind": "relu_bn"}})
    try:
        model = prepare_binary(SignedNet())
    finally:
        del LAYOUTS[SignedNet]
    assert [name for name, _ in binary_layers(model)] == ["body"]  # the first conv stays float
    assert isinstance(model.relu, torch.nn.Identity) and isinstance(model.bn, ReLUBatchNorm2d)


@pytest.mark.parametrize("arch,options", [("resnet20", {}), ("vgg-small", {"scale": "channel", "keep_bits": 8})])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, arch, options):
    torch.manual_seed(0)
    model = prepare_binary(build_model(arch), **options)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 28, 28))  # move BN statistics, initialise LSQ scales
    x = torch.randn(2, 3, 28, 28)
    expected = model.eval()(x)
    save_checkpoint(tmp_path / "model.pt", model, arch, 10, 3, 28, {})
    loaded, payload = load_model(tmp_path / "model.pt")
    assert payload["plan"] == model.qtool_plan
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(loaded(x), expected)


# -- schedule and indicators --------------------------------------------------------------------

def test_o_schedule_start_middle_end():
    assert o_schedule(0, 1001, 3.0) == 1.0
    assert o_schedule(500, 1001, 3.0) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)))  # 1.586
    assert o_schedule(1000, 1001, 3.0) == pytest.approx(3.0)  # the last epoch trains at o_end
    assert o_schedule(9, 10, 3.0) == pytest.approx(3.0) and o_schedule(0, 1, 3.0) == 1.0


def test_indicators_on_a_constructed_tensor():
    z = torch.tensor([0.25, -1.0, 0.0, 4.0])
    # o = 2: f(z) = [0.5, -1, 0, 2], sign(z) = [1, -1, 1, 1] -> differences [-0.5, 0, -1, 1]
    assert estimating_error(z, 2.0) == pytest.approx(1.5)
    assert estimating_error(z, 1.0) == pytest.approx(math.sqrt(0.75**2 + 1 + 9))
    # |g| = [1, 3, 2, 2]: mean 2, unbiased variance (1 + 1 + 0 + 0) / 3
    assert gradient_stability(torch.tensor([1.0, -3.0, 2.0, -2.0])) == pytest.approx(2 / 3)


def tiny_split(images_per_domain: int = 16) -> Split:
    generator = torch.Generator().manual_seed(0)

    def domain(name):
        images = torch.randint(0, 256, (images_per_domain, 3, 28, 28), dtype=torch.uint8, generator=generator)
        return Domain(name, images, torch.randint(0, 10, (images_per_domain,), generator=generator))

    return Split({"a": domain("a"), "b": domain("b")}, {"a": domain("a"), "b": domain("b")}, None)


def test_schedule_callback_sets_o_each_epoch_and_logs_one_value_per_epoch():
    torch.manual_seed(0)
    model = prepare_binary(build_model("resnet20"))
    config = TrainConfig(steps=12, batch_size=8, lr=1e-3, optimizer="plain", augment=False, evals=1)
    trainer = Trainer(model, tiny_split(), config)  # 32 images / 8 per step: 4 steps per epoch, 3 epochs
    layers = [layer for _, layer in binary_layers(model)]
    schedule = EstimatorSchedule(layers, "reste", o_end=3.0)
    seen_o = []
    probe = type("Probe", (), {"on_step_end": lambda self, trainer, step, loss: seen_o.append(layers[-1].estimator.o)})
    trainer.callbacks = [schedule, probe()]
    trainer.fit()
    expected = [1.0, 1 + 2 * (1 - math.cos(math.pi / 4)), 3.0]
    log = schedule.report()["estimator"]
    assert log["o"] == pytest.approx(expected)
    assert seen_o == pytest.approx([o for o in expected for _ in range(4)])
    assert len(log["estimating_error"]) == len(log["gradient_stability"]) == 3
    assert log["estimating_error"][-1] == pytest.approx(
        sum(estimating_error(layer.weight, 3.0) for layer in layers) / len(layers))
    assert all(value > 0 for value in log["gradient_stability"])

    state = schedule.state_dict()
    restored = EstimatorSchedule(layers, "reste", o_end=3.0)
    for layer in layers:
        layer.estimator.o = 1.0
    restored.load_state_dict(state)
    assert restored.report() == schedule.report() and layers[0].estimator.o == pytest.approx(3.0)


# -- the command line ---------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    """``qtool ARGS`` in this process: (exit code, stderr)."""
    from qtool.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def test_quantize_bits1_reste_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "quantize", "resnet20", "--data", "rotated-digits", "--bits", "1", "--method", "reste",
                        "--steps", "3", "--pretrain-epochs", "0.02", "--pretrain-method", "plain", "--evals", "1",
                        "--batch-size", "36", "--cache-dir", str(tmp_path / "cache"),
                        "-O", "o_end=3", "-O", "t=1.5", "-O", "m=0.1", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    log = report["estimator"]
    assert report["bits"] == 1 and report["method"] == "reste" and report["steps"] == 3
    assert log["o"] == [1.0] and len(log["estimating_error"]) == len(log["gradient_stability"]) == 1
    assert (out / "estimator.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, err = run_cli(capsys, "eval", str(out / "model.pt"), "--data", "rotated-digits", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == report["accuracy"]


@pytest.mark.parametrize("args,message", [
    (["resnet20", "--method", "reste", "-O", "bogus=1"], "unknown reste option bogus"),
    (["resnet20", "--method", "ste", "-O", "o_end=2"], "takes none"),
    (["resnet20", "--method", "reste", "-O", "estimator=ste"], "choose another with --method"),
    (["mobilenetv2", "--method", "reste"], "--bits 1 supports"),
])
def test_quantize_bits1_rejects_bad_requests_before_training(tmp_path, capsys, args, message):
    code, err = run_cli(capsys, "quantize", *args, "--bits", "1", "--data", "rotated-digits", "--out", str(tmp_path / "x"))
    assert code == 2
    assert err.strip().startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x" / "model.pt").exists()
