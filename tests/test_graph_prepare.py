"""Quantizer placement on the traced graph: every tensor the integer graph holds is quantized in
the trained model, the layers compute the deployed arithmetic in eval mode, and the blocks real
architectures use export to fused integer kernels that reproduce PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from qtool.exporters import export
from qtool.exporters.bounds import saturating_kernels
from qtool.models import build_model
from qtool.onnxrt import float_layers
from qtool.quant.graph import GRAPH_KEY
from qtool.quant.integer import IntegerAdd, IntegerMul, integer_layer, joins_computed_as
from qtool.quant.layers import QuantConv2d
from qtool.quant.lsq import LSQQuantizer
from qtool.quant.prepare import prepare

from tiny_models import train


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class SqueezeExcite(nn.Module):
    """timm's form: spatial mean, reduce, ReLU, expand, gate, multiply."""

    def __init__(self, channels: int, gate: str):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)
        self.gate = gate

    def forward(self, x):
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        gate = torch.sigmoid(s) if self.gate == "sigmoid" else F.relu6(s + 3.0) / 6.0  # timm's hard_sigmoid
        return x * gate


class ShuffleBlock(nn.Module):
    """ShuffleNet-v2: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), nn.ReLU(), conv_bn(half, half, 3, groups=half),
                                    conv_bn(half, half, 1), nn.ReLU())

    def forward(self, x):
        keep, change = x.chunk(2, dim=1)
        x = torch.cat([keep, self.branch(change)], dim=1)
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ZooOfBlocks(nn.Module):
    """One network holding every block kind real architectures bring: hardswish, squeeze-
    excitation with a sigmoid and with a hard sigmoid, ReLU6/clamp, channel split and shuffle,
    channel slicing, concatenation, dropout and identity, global mean, flatten."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.act = nn.Hardswish()
        self.se1 = SqueezeExcite(16, "sigmoid")
        self.shuffle = ShuffleBlock(16)
        self.expand = conv_bn(16, 24, 1)
        self.se2 = SqueezeExcite(24, "hard")
        self.side = conv_bn(16, 8, 1)
        self.drop, self.skip = nn.Dropout(0.1), nn.Identity()
        self.head = nn.Linear(24 + 8, classes)

    def forward(self, x):
        x = self.se1(self.act(self.stem(x)))
        x = self.shuffle(x)
        wide = self.se2(torch.clamp(self.expand(x), 0.0, 6.0))
        narrow = F.relu6(self.side(x))[:, :8]
        x = self.skip(self.drop(torch.cat([wide, narrow], dim=1)))
        return self.head(torch.flatten(x.mean((2, 3)), 1))


def images(count: int = 256, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: the class is the quadrant holding a bright patch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    x = torch.randn(count, 3, size, size, generator=generator) * 0.3
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        half = size // 2
        x[index, label % 3, row * half + 1:row * half + half - 1, col * half + 1:col * half + half - 1] += 2.0
    return x, labels


@pytest.fixture(scope="module")
def blocks_model():
    torch.manual_seed(0)
    x, y = images()
    model = train(ZooOfBlocks(), x, y, steps=30)
    quantized = prepare(model, bits=4, act_bits=4)
    return train(quantized, x, y, steps=15, lr=1e-3)


def test_every_block_kind_exports_fused_and_reproduces_pytorch(blocks_model, tmp_path):
    x, y = images(seed=1)
    result = export(blocks_model, x[:1], tmp_path / "blocks.onnx", calibration=x[:64], verify=x, labels=y)
    ops = result.ops
    assert float_layers(ops) == {} and "ConvInteger" not in ops and result.notes == []
    assert ops["QLinearConv"] == 10 and ops["QGemm"] == 1
    assert ops["QLinearMul"] == 2 and ops["QLinearGlobalAveragePool"] == 3  # both SE gates; 2 SE means + the head's
    assert ops["Gather"] == 3  # hardswish, sigmoid, hard sigmoid: code -> code tables
    assert result.verification.passed and result.verification.agreement >= 0.995
    assert saturating_kernels(onnx.load(tmp_path / "blocks.onnx")) == []


def test_concatenated_tensors_share_one_quantizer(blocks_model):
    names = [node.target for node in blocks_model.graph.nodes if node.op == "call_module"
             and isinstance(blocks_model.get_submodule(node.target), LSQQuantizer)]
    # the kept half of the split and the branch output both join the shuffle's cat: one grid
    assert len(names) > len(set(names))


def test_quantizers_sit_on_both_operands_and_the_result_of_every_residual_add():
    model = prepare(build_model("resnet20"), bits=4, act_bits=4)
    adds = [node for node in model.graph.nodes
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), IntegerAdd)]
    assert len(adds) == 9 and not [node for node in model.graph.nodes if node.op == "call_function"
                                   and getattr(node.target, "__name__", "") in ("add", "iadd")]
    quantizer = lambda node: node.op == "call_module" and isinstance(model.get_submodule(node.target), LSQQuantizer)
    for add in adds:
        assert all(quantizer(operand) for operand in add.args)
        (relu,) = add.users
        (after,) = relu.users
        assert quantizer(after)
        steps = [step.target for step in add.kwargs["steps"]]
        assert steps == [f"{add.args[0].target}.scale", f"{add.args[1].target}.scale", f"{after.target}.scale"]


def qlinear_session(op: str, steps, zeros, n: int):
    """onnxruntime's QLinearAdd / QLinearMul (com.microsoft) on two uint8 vectors of length n."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    scales = [helper.make_tensor(f"s{i}", TensorProto.FLOAT, [], [float(v)]) for i, v in enumerate(steps)]
    points = [helper.make_tensor(f"z{i}", TensorProto.UINT8, [], [int(v)]) for i, v in enumerate(zeros)]
    node = helper.make_node(op, ["a", "s0", "z0", "b", "s1", "z1", "s2", "z2"], ["c"], domain="com.microsoft")
    vector = lambda name: helper.make_tensor_value_info(name, TensorProto.UINT8, [n])
    graph = helper.make_graph([node], "join", [vector("a"), vector("b")], [vector("c")], scales + points)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("op, join, float_op", [("QLinearAdd", IntegerAdd, torch.add), ("QLinearMul", IntegerMul, torch.mul)])
def test_integer_joins_compute_codes_exactly_as_onnxruntimes_kernels(op, join, float_op):
    """IntegerAdd / IntegerMul in eval mode against onnxruntime's own QLinearAdd / QLinearMul, on
    every pair of grid signs and random steps (a vector length that leaves a tail after the SIMD
    blocks): the same codes everywhere, where the float op on the two fake-quantized tensors
    misses some."""
    from qtool.quant.integer import container_zero_point

    rng = np.random.default_rng(0)
    module, n, float_misses = join().eval(), 16411, 0
    for trial in range(80):
        signed = [bool(v) for v in rng.integers(0, 2, 3)]
        steps = [torch.tensor(float(np.exp(rng.uniform(-5, 0))), dtype=torch.float32) for _ in range(3)]
        zeros = [container_zero_point(flag) for flag in signed]
        container = [torch.from_numpy(rng.integers(0, 256, n).astype(np.uint8)) for _ in range(2)]
        a, b = ((c.float() - zero) * step for c, zero, step in zip(container, zeros, steps))
        ready = (torch.tensor(True),) * 3
        got = module(a, b, steps=tuple(steps), signed=tuple(torch.tensor(f) for f in signed), ready=ready)
        codes = torch.round(got / steps[2]) + zeros[2]
        (expected,) = qlinear_session(op, steps, zeros, n).run(None, {"a": container[0].numpy(),
                                                                     "b": container[1].numpy()})
        assert torch.equal(codes, torch.from_numpy(expected).float()), (trial, signed)
        float_result = torch.clamp(torch.round(float_op(a, b) / steps[2]) + zeros[2], 0, 255)
        float_misses += int((float_result != codes).sum())
        trained = module.train()(a, b, steps=tuple(steps), signed=signed, ready=ready)
        assert torch.equal(trained, float_op(a, b))  # training: the float op
        module.eval()
    assert float_misses > 0  # the inputs reach the rounding boundaries where the two differ


def test_joins_can_compute_as_arms_fixed_point_qlinear_add_and_go_back():
    """ARM's QLinearAdd rounds in fixed point, half away from zero; x86's in float32, half to even:
    on a tie (steps 1, 1, 2: ratios 0.5) they part, and ``joins_computed_as`` picks which one eval
    mode reproduces (test_emulated_arm.py checks both against onnxruntime on each CPU)."""
    steps = (torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0))
    ready, signed = (torch.tensor(True),) * 3, (torch.tensor(False),) * 3
    a, b = torch.tensor([1.0, 3.0, 0.0, 5.0]), torch.tensor([0.0, 0.0, 0.0, 2.0])
    join = nn.Sequential(IntegerAdd()).eval()
    x86 = join[0](a, b, steps=steps, signed=signed, ready=ready)
    with joins_computed_as(join, "arm"):
        arm = join[0](a, b, steps=steps, signed=signed, ready=ready)
    assert x86.tolist() == [0.0, 4.0, 0.0, 8.0] and arm.tolist() == [2.0, 4.0, 0.0, 8.0]  # 0.5 -> 0 / 1 step
    assert join[0].kernels == "x86" and torch.equal(join[0](a, b, steps=steps, signed=signed, ready=ready), x86)
    with pytest.raises(ValueError, match="kernels must be one of"):
        with joins_computed_as(join, "riscv"):
            pass


def test_eval_mode_computes_the_integer_kernel_exactly():
    """conv + folded BN, in eval: (sum of code products + int32 bias) * unit, computed in float64 from
    the layer's integer view, equals what the layer returns (float32 rounding aside)."""
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
                    bits=4, act_bits=4, first_last_bits=4)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    layer = model.get_submodule("0")
    with torch.no_grad():
        layer.bn.weight[0] = -0.5  # a negative gamma flips that channel's codes
    assert isinstance(layer, QuantConv2d) and layer.bn is not None  # the BatchNorm folded into the conv
    quantizer = model.qtool_act.input_1  # fx names the placeholder of nn.Sequential "input_1"
    step = quantizer.scale
    x = torch.randn(4, 3, 8, 8)
    codes = torch.clamp(torch.round(x / step), quantizer.qmin, quantizer.qmax)
    view = integer_layer(layer, step)
    accumulator = F.conv2d(codes.double(), view.codes.double(), padding=1)
    expected = (accumulator + view.bias_codes.double().reshape(1, -1, 1, 1)) * view.unit.double().reshape(1, -1, 1, 1)
    got = layer(quantizer(x), input_step=step)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    trained = layer.weight_quantizer.quantize_int(layer.weight) * torch.sign(layer.weight_quantizer.scale).reshape(-1, 1, 1, 1)
    assert view.codes.abs().max() <= 7 and torch.equal(view.codes[0], -trained[0].int())


def test_a_model_fx_cannot_trace_falls_back_to_the_layer_swap_with_one_notice(capsys):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    model = prepare(DataDependent(), bits=4)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "cannot trace DataDependent" in notice[0] and "approximate" in notice[0]
    assert GRAPH_KEY not in model.qtool_plan and model.conv.input_quantizer is not None


def test_a_graph_prepared_checkpoint_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = prepare(build_model("mobilenetv2"), bits=3, act_bits=3)
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model, "mobilenetv2", 10, 3, 32, {})
    rebuilt = model_from_checkpoint(read_checkpoint(tmp_path / "m.pt"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))


def test_the_saturation_bound_is_read_from_the_graph():
    """8-bit weight codes on 8-bit input codes: flagged (on any CPU); 7-bit codes: fine."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(max_weight: int) -> onnx.ModelProto:
        weights = numpy_helper.from_array(np.full((4, 16, 1, 1), max_weight, np.int8), "w")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
                 helper.make_node("Conv", ["xd", "wd"], ["y"])]
        inits = [weights, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "zp"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits))

    assert saturating_kernels(graph(127)) == ["y"]
    assert saturating_kernels(graph(63)) == []


@pytest.mark.parametrize("arch, bits", [("resnet20", 4), ("resnet20", 3), ("mobilenetv2", 4), ("mobilenetv2", 3),
                                        ("vgg-small", 4), ("dg-cnn", 3)])
def test_zoo_models_export_fused_and_exact(arch, bits, tmp_path):
    """Even untrained (nearly flat logits, where any float rounding difference would show): the
    integer kernels reproduce PyTorch at the fixed bar, since PyTorch's eval mode sums the same
    integer codes exactly."""
    from qtool.exporters.verify import MIN_AGREEMENT, compare

    torch.manual_seed(0)
    model = prepare(build_model(arch), bits=bits, act_bits=bits)
    x = torch.randn(48, 3, 32, 32)
    model.train()
    model(x)
    result = export(model.eval(), x[:1], tmp_path / "m.onnx", calibration=x[:16])
    assert float_layers(result.ops) == {} and result.notes == [] and "ConvInteger" not in result.ops
    check = compare(model, str(tmp_path / "m.onnx"), x)
    assert check.agreement >= MIN_AGREEMENT and check.within_step >= MIN_AGREEMENT
