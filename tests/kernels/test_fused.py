"""The fused integer layer ops (``qtool.lowbit.fused``): the compiled kernel against its reference bit
for bit on every ISA, the reference against PyTorch's fake quantizers, op registration (opcheck),
and whole graph-prepared models whose every code tensor and logit the fused model reproduces."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit_testing import runnable_isas
from qtool.lowbit import fused_reference as fr

INF = math.inf


@pytest.fixture(scope="module")
def fused(qops):
    from qtool.lowbit import fused

    return fused


# --------------------------------------------------------------------------- op arguments
def conv_call(g, *, bits=8, N=2, C=16, H=9, W=7, O=24, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
              dilation=(1, 1), x_dtype=torch.uint8, residual=None, out_float=False, wmax=None, clamp=(0.0, INF),
              out_range=(0, 15), add_range=(0, 15), add_clamp=(0.0, INF), steps=(0.0123, 0.031, 0.045),
              multiplier=False, residual_first=False):
    """Random arguments of fused_conv2d (codes, weights, bias, unit and an epilogue)."""
    K = C * kernel[0] * kernel[1]
    lo, hi = {3: (-4, 3), 4: (-8, 7), 8: (-128, 127)}[bits]
    if wmax is not None:
        lo, hi = -wmax, wmax
    codes = torch.randint(lo, hi + 1, (O, K), generator=g)
    from qtool.lowbit import ops

    w = ops.pack_weights(codes, bits) if bits != 8 else fr.lanes_weights(codes)
    x = random_codes(g, (N, C, H, W), x_dtype)
    bias = torch.randint(-3000, 3000, (O,), generator=g, dtype=torch.int32)
    unit = torch.rand(O, generator=g) * 1e-3 + 1e-4
    OH = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    r = None if residual is None else random_codes(g, (N, O, OH, OW), residual)
    s1, sr, s2 = steps
    mult = unit / torch.tensor(s1) if multiplier else None  # float32(unit / out_step), as the layer computes it
    return (x, w, bias, unit, mult, bits, list(kernel), list(stride), list(padding), list(dilation), list(clamp),
            0.0 if out_float else s1, list(out_range), r, sr if r is not None else 0.0, list(add_clamp),
            s2 if r is not None else 0.0, list(add_range)) + ((True,) if residual_first else ())


def linear_call(g, *, bits=8, M=5, K=100, O=24, x_dtype=torch.int8, residual=None, out_float=False,
                out_range=(-8, 7), multiplier=False, residual_first=False):
    args = conv_call(g, bits=bits, N=M, C=K, H=1, W=1, O=O, kernel=(1, 1), padding=(0, 0), x_dtype=x_dtype,
                     residual=residual, out_float=out_float, out_range=out_range, add_range=(-8, 7),
                     multiplier=multiplier, residual_first=residual_first)
    x, w, bias, unit, mult = args[:5]
    r = args[13]
    return (x.reshape(M, K), w, bias, unit, mult, bits, *args[10:13], None if r is None else r.reshape(M, O),
            *args[14:])


def random_codes(g, shape, dtype):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last) \
        if len(shape) == 4 else torch.randint(lo, hi, shape, generator=g).to(dtype)


CONV_CASES = {
    "lanes": dict(),
    "lanes_int8_input": dict(x_dtype=torch.int8),
    "lanes_7bit_weights": dict(wmax=63, x_dtype=torch.int8),
    "lanes_wide_weights": dict(wmax=127),  # beyond AVX2's vpmaddubsw bound: the scalar tile
    "lanes_residual": dict(residual=torch.int8, out_range=(-8, 7)),
    "lanes_residual_uint8": dict(residual=torch.uint8, add_range=(0, 255), add_clamp=(-INF, INF)),
    # the residual as QLinearAdd's first operand (``shortcut + out``), into a signed sum
    "lanes_residual_first": dict(residual=torch.uint8, residual_first=True, add_range=(-128, 127),
                                 add_clamp=(-INF, INF)),
    "lanes_float_out": dict(out_float=True, O=10, clamp=(-INF, INF)),
    "lanes_signed_out": dict(out_range=(-128, 127), clamp=(-1.0, 2.0)),
    "lanes_gathered": dict(C=3, x_dtype=torch.int8),  # kw * C not a multiple of 4
    "lanes_dilated": dict(C=5, kernel=(3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1)),
    "lanes_dilated_columns": dict(C=8, kernel=(3, 3), stride=(2, 2), padding=(2, 2), dilation=(2, 2)),
    "lanes_1x1_stride2": dict(C=32, O=40, kernel=(1, 1), padding=(0, 0), stride=(2, 2), N=5, H=11, W=13),
    "lanes_many_rows": dict(N=3, C=16, O=64, H=17, W=19),
    "lanes_multiplier": dict(multiplier=True),
    "lanes_multiplier_residual": dict(multiplier=True, residual=torch.int8, out_range=(-8, 7)),
    "lanes_multiplier_relu6": dict(multiplier=True, clamp=(0.0, 0.06)),
    "packed4_multiplier": dict(bits=4, x_dtype=torch.int8, multiplier=True),
    "packed4": dict(bits=4, x_dtype=torch.int8),
    "packed3": dict(bits=3, x_dtype=torch.int8),
    "packed4_residual": dict(bits=4, x_dtype=torch.int8, residual=torch.uint8, add_range=(0, 255)),
    "packed4_residual_first": dict(bits=4, x_dtype=torch.int8, residual=torch.int8, out_range=(-8, 7),
                                   residual_first=True),
    "packed4_1x1": dict(bits=4, x_dtype=torch.int8, C=64, kernel=(1, 1), padding=(0, 0)),
    "packed4_dilated": dict(bits=4, x_dtype=torch.int8, C=5, kernel=(3, 1), stride=(2, 1), padding=(2, 0),
                            dilation=(2, 1)),
    "packed4_float_out": dict(bits=4, x_dtype=torch.int8, out_float=True),
}

LINEAR_CASES = {
    "lanes": dict(),
    "lanes_uint8": dict(x_dtype=torch.uint8, K=64),
    "lanes_residual": dict(residual=torch.int8),
    "lanes_residual_first": dict(residual=torch.int8, residual_first=True),
    "lanes_float_out": dict(out_float=True, O=10),
    "packed4": dict(bits=4),
    "packed3_K128": dict(bits=3, K=128),
    "packed4_float_out": dict(bits=4, out_float=True),
    "lanes_multiplier": dict(multiplier=True),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_equals_reference_bitwise(qops, isa, case):
    args = conv_call(torch.Generator().manual_seed(hash(case) % 1000), **CONV_CASES[case])
    out, expected = torch.ops.qtool.fused_conv2d(*args), fr.fused_conv2d(*args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected), f"{(out.float() != expected.float()).sum()} outputs differ"


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_equals_reference_bitwise(qops, isa, case):
    args = linear_call(torch.Generator().manual_seed(hash(case) % 1000), **LINEAR_CASES[case])
    out, expected = torch.ops.qtool.fused_linear(*args), fr.fused_linear(*args)
    assert out.dtype == expected.dtype and torch.equal(out, expected)


def test_threads_give_the_same_codes(qops):
    args = conv_call(torch.Generator().manual_seed(5), N=4, H=16, W=16, O=32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qtool.fused_conv2d(*args)
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.qtool.fused_conv2d(*args), one)
    finally:
        torch.set_num_threads(previous)


# -------------------------------------------------------- the arithmetic is PyTorch's own
def fake_quant(x, step, qmin, qmax):
    return torch.ops.qtool.lsq_fake_quant(x, torch.tensor([step]), float(qmin), float(qmax), 1.0)


@pytest.mark.parametrize("multiplier", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_epilogue_is_the_fake_quant_models_arithmetic(qops, ties, multiplier):
    """Codes of the op = PyTorch's: the deployed layer output (qtool.quant.integer.deployed_output:
    float32(acc + bias) * unit, or requantized with float32(unit / step)), LSQ's fake quantizer, the
    float add of two fake-quantized tensors, ReLU, the next fake quantizer. ``ties`` makes every
    y / step land on .5 (powers of two): round half to even, clamps at the range ends."""
    g = torch.Generator().manual_seed(3 + ties)
    M, K, O = 64, 40, 32
    codes = torch.randint(-7, 8, (O, K), generator=g)
    x = torch.randint(0, 16, (M, K), generator=g).to(torch.uint8)
    bias = torch.randint(-200, 200, (O,), generator=g, dtype=torch.int32)
    r = torch.randint(-8, 8, (M, O), generator=g).to(torch.int8)
    if ties:
        unit, s1, sr, s2 = torch.full((O,), 0.5), 1.0, 0.25, 2.0
    else:
        unit, s1, sr, s2 = torch.rand(O, generator=g) * 0.01, 0.11, 0.093, 0.17
    mult = unit / torch.tensor(s1) if multiplier else None
    args = (x, fr.lanes_weights(codes), bias, unit, mult, 8, [0.0, INF], s1, [-8, 7], r, sr, [0.0, INF], s2,
            [0, 15])
    out = torch.ops.qtool.fused_linear(*args)

    acc = x.float() @ codes.float().T  # exact: integers below 2^24
    y = torch.relu(torch.round((acc + bias.float()) * mult) * s1 if multiplier else (acc + bias.float()) * unit)
    a = fake_quant(y, s1, -8, 7)
    z = torch.relu(a + r.float() * sr)
    expected = torch.round(fake_quant(z, s2, 0, 15) / s2)
    assert torch.equal(out.float(), expected)
    if ties and not multiplier:
        v = (torch.relu((acc + bias.float()) * unit) / s1)
        assert bool(((v - v.floor()) == 0.5).any()), "the tie case must contain ties"
    assert torch.equal(out, fr.fused_linear(*args))


# ---------------------------------------------------------------------------- registration
def test_schemas_match_the_compiled_library(qops):
    for name, schema in fr.SCHEMAS.items():
        assert str(getattr(torch.ops.qtool, name).default._schema) == f"qtool::{schema}"


OPCHECK = {
    "conv_lanes": ("fused_conv2d", dict()),
    "conv_lanes_residual": ("fused_conv2d", dict(residual=torch.int8, out_range=(-8, 7))),
    "conv_packed_float": ("fused_conv2d", dict(bits=4, x_dtype=torch.int8, out_float=True)),
    "linear_lanes": ("fused_linear", dict()),
    "linear_packed_residual": ("fused_linear", dict(bits=4, residual=torch.uint8)),
    "conv_residual_first": ("fused_conv2d", dict(residual=torch.int8, out_range=(-8, 7), residual_first=True)),
    "linear_lanes_multiplier": ("fused_linear", dict(multiplier=True)),
}


@pytest.mark.parametrize("case", sorted(OPCHECK))
def test_opcheck(qops, case):
    name, kwargs = OPCHECK[case]
    make = conv_call if name == "fused_conv2d" else linear_call
    args = make(torch.Generator().manual_seed(1), **kwargs)
    torch.library.opcheck(getattr(torch.ops.qtool, name).default, args)


def test_bad_arguments_are_refused_with_a_message(qops):
    args = list(conv_call(torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="lanes panels"):
        torch.ops.qtool.fused_conv2d(args[0], args[1][:, :-1], *args[2:])
    with pytest.raises(RuntimeError, match="int8 or uint8"):
        torch.ops.qtool.fused_conv2d(args[0].float(), *args[1:])
    packed = conv_call(torch.Generator().manual_seed(0), bits=4, x_dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8 input codes"):
        torch.ops.qtool.fused_conv2d(packed[0].to(torch.uint8), *packed[1:])


# ------------------------------------------------------------------------- whole models
def calibrated(model: nn.Module, bits: int, x: torch.Tensor) -> nn.Module:
    from qtool.quant.prepare import prepare

    torch.manual_seed(0)
    q = prepare(model, bits=bits, act_bits=bits)
    with torch.no_grad():
        q(x)
    return q.eval()


class SmallNet(nn.Module):
    """Max-pool, a projected residual (fused), ReLU6, non-square dilated kernels, linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(16, 24, 1)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(32, 32, (3, 1), padding=(2, 0), dilation=(2, 1))
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 40), nn.Linear(40, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.down(x) + self.bn2(self.conv2(x)))
        y = F.relu6(self.conv3(y))
        y = torch.relu(self.conv4(y))
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


class Fallbacks(nn.Module):
    """A residual fused into the layer computed second, and patterns that run in float: an add of
    two code tensors no layer produced, a grouped conv, a sigmoid gate, global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2, self.conv3 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = F.relu(self.conv2(x) + self.conv3(x))  # fused into conv3, whose codes come second
        y = y + x
        y = self.grouped(y) * torch.sigmoid(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def seeded(cls):
    torch.manual_seed(0)
    return cls()


def resnet20():
    from qtool.models.resnet import resnet20

    torch.manual_seed(0)
    return resnet20()


def code_tensors(model, fused_model, x):
    """Every tensor quantizer's codes in the fake-quant model, and the fused model's codes for the
    same quantizers; both models' outputs."""
    captured = {}
    def hook(name):
        return lambda mod, inp, out: captured.__setitem__(name, torch.round(out / mod.scale))

    hooks = [q.register_forward_hook(hook(name)) for name, q in model.qtool_act.named_children()]
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for h in hooks:
            h.remove()
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            values[node.name] = result = super().run_node(node)
            return result

    with torch.no_grad():
        out = Recorder(fused_model).run(x)
    pairs = {name: (values[node], captured[name.split(".", 1)[1]]) for name, node in fused_model.codes.items()}
    return pairs, out, expected


MODELS = {"resnet20": (resnet20, (3, 32, 32)), "small": (lambda: seeded(SmallNet), (3, 16, 16))}


@pytest.mark.parametrize("weights", ["lanes", "packed"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("name", ["resnet20", "small"])
def test_fused_model_reproduces_every_code_and_logit(fused, name, bits, weights):
    build, shape = MODELS[name]
    model = calibrated(build(), bits, torch.randn(16, *shape, generator=torch.Generator().manual_seed(1)))
    fused_model = fused.fuse(model, weights=weights)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    pairs, out, expected = code_tensors(model, fused_model, x)
    assert len(pairs) >= (23 if name == "resnet20" else 7)  # a residual's first quantizer stays inside its op
    for quantizer, (codes, reference) in pairs.items():
        assert codes.dtype in (torch.int8, torch.uint8), quantizer
        assert torch.equal(codes.float(), reference), f"{quantizer}: {(codes.float() != reference).sum()} codes differ"
    assert torch.equal(out, expected)
    layers = [n for n, m in model.named_modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear")]
    assert set(fused_model.fused) == set(layers)
    if weights == "packed":
        packed = [what for what in fused_model.fused.values() if "packed" in what]
        assert len(packed) == len(layers) - 2  # all but the 8-bit first and last layers
    if name == "resnet20":
        assert set(fused_model.kept) == {"pool"}  # global average pooling, in float as in PyTorch
        residuals = [what for what in fused_model.fused.values() if " + " in what]
        assert len(residuals) == 9


def test_fused_model_on_every_isa(fused, qops):
    model = calibrated(resnet20(), 4, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        for weights in ("lanes", "packed"):
            fused_model = fused.fuse(model, weights=weights)
            for name in runnable_isas(qops):
                qops.set_isa(name)
                try:
                    assert torch.equal(fused_model(x), expected), (weights, name)
                finally:
                    qops.set_isa("auto")


def test_unfusable_patterns_fall_back_exactly_with_reasons(fused):
    model = calibrated(seeded(Fallbacks), 4, torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    fused_model = fused.fuse(model)
    pairs, out, expected = code_tensors(model, fused_model, torch.randn(3, 3, 8, 8))
    for quantizer, (codes, reference) in pairs.items():
        assert torch.equal(codes.float(), reference), quantizer
    assert torch.equal(out, expected)
    kept = fused_model.kept
    assert set(kept) == {"add_1", "grouped", "sigmoid", "mul", "adaptive_avg_pool2d"}, kept
    assert "grouped" in kept["grouped"] and "dequantized" in kept["add_1"]
    assert set(fused_model.fused) == {"conv1", "conv2", "conv3", "fc"}
    assert " + qtool_act.conv2" in fused_model.fused["conv3"]


def test_fuse_takes_only_graph_prepared_models(fused):
    with pytest.raises(TypeError, match="graph-prepared"):
        fused.fuse(nn.Linear(3, 3))


def test_convert_is_a_drop_in_for_the_runtime_conversion(fused):
    from qtool.lowbit import runtime

    model = calibrated(seeded(SmallNet), 4, torch.randn(8, 3, 16, 16))
    conversion = fused.convert(model)
    assert isinstance(conversion, runtime.Conversion) and isinstance(conversion.model, fused.FusedModel)
    assert conversion.converted == conversion.model.fused and conversion.kept == conversion.model.kept
    plain = nn.Sequential(nn.Linear(4, 4))
    assert not isinstance(fused.convert(plain).model, fused.FusedModel)  # not graph-prepared: runtime.convert


def test_fused_model_traces_with_torch_compile(fused):
    model = calibrated(seeded(SmallNet), 4, torch.randn(8, 3, 16, 16))
    fused_model = fused.fuse(model)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(fused_model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), fused_model(x))


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from qtool.lowbit import ops
from qtool.lowbit.fused import fuse
from test_fused import SmallNet, calibrated, seeded
model = calibrated(seeded(SmallNet), 4, torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    out = fuse(model)(x)
    expected = model(x)
torch.save({{"backend": ops.backend(), "out": out, "expected": expected}}, sys.argv[1])
"""


def test_reference_backend_runs_the_same_fused_model(fused, tmp_path):
    """QTOOL_KERNELS=reference: the ops are the PyTorch reference, same codes and logits."""
    path = tmp_path / "out.pt"
    code = CHILD.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(__file__), env={**os.environ, "QTOOL_KERNELS": "reference"})
    assert result.returncode == 0, result.stderr
    child = torch.load(path)
    assert child["backend"] == "reference"
    assert torch.equal(child["out"], child["expected"])
    model = calibrated(seeded(SmallNet), 4, torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fused.fuse(model)(x), child["out"])
