"""GAQAT: the sign measures on constructed gradients, exactly which direction entries a freeze
edits, re-decisions (unfreeze, permanent), state round trips, and the CLI end to end."""

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.quant.scales import ScaleParameter, scale_parameters
from qtool.train.gaqat import GAQAT, GAQATConfig, conflict, disorder
from qtool.train.optim import SAGM, TwoPassGrads

P, N = 1.0, -1.0


# -- the measures ---------------------------------------------------------------------------

def signs(*columns):
    return torch.tensor(list(zip(*columns)), dtype=torch.int8)


def test_disorder_counts_sign_flips_between_consecutive_steps():
    measured = disorder(signs(
        [P, P, P, P, P],  # steady: 0
        [P, N, P, N, P],  # flips every step: 1
        [P, P, N, N, P],  # 2 flips in 4 pairs
        [P, 0, N, 0, P],  # zero gradients flip nothing
    ))
    assert measured.tolist() == [0.0, 1.0, 0.5, 0.0]


def test_conflict_is_the_share_of_steps_with_opposite_signs():
    task = signs([P, P, N, N], [P, P, P, P], [P, 0, N, N])
    smooth = signs([P, N, N, P], [N, N, N, N], [N, N, N, P])
    assert conflict(task, smooth).tolist() == [0.5, 1.0, 0.5]


# -- the hook on constructed gradients -------------------------------------------------------

class Toy:
    """Two quantizers ("a": a 2-channel scale, "b": one value) and one weight, with gradients we choose."""

    def __init__(self, **options):
        self.weight = nn.Parameter(torch.zeros(3))
        self.scale_a = nn.Parameter(torch.ones(2))
        self.scale_b = nn.Parameter(torch.ones(1))
        self.params = [self.weight, self.scale_a, self.scale_b]
        scales = [ScaleParameter("a", "", "a.scale", self.scale_a), ScaleParameter("b", "", "b.scale", self.scale_b)]
        self.gaqat = GAQAT(scales, GAQATConfig.from_options(options))

    def step(self, task_a, task_b, perturbed_a=P, perturbed_b=P):
        """One SAGM step whose scale gradients have these signs (a's channels share the sign)."""
        grad = [torch.tensor([0.3, -0.2, 0.5]), torch.tensor([task_a * 2.0, task_a * 1.0]), torch.tensor([task_b * 3.0])]
        perturbed = [torch.tensor([0.1, 0.4, -0.7]), torch.tensor([perturbed_a * 5.0, perturbed_a * 1.0]),
                     torch.tensor([perturbed_b * 7.0])]
        direction = [0.5 * (g + gp) for g, gp in zip(grad, perturbed)]
        grads = TwoPassGrads(self.params, grad, perturbed, direction, 1.0, 1.1)
        self.gaqat(grads)
        return grads


def test_measures_use_the_last_window_in_time_order():
    toy = Toy(window=4, every=2, tau=0.2)
    # a's task signs over 6 steps; the last window (steps 3-6) is + + + -: one flip in three pairs.
    # Read in ring-buffer order (5, 6, 3, 4) it would be + - + +: two flips.
    for task_a, perturbed_a in [(N, P), (P, P), (P, N), (P, N), (P, P), (N, N)]:
        toy.step(task_a, P, perturbed_a)
    history = toy.gaqat.history
    assert history["step"] == [2, 4, 6]
    assert history["disorder"][0] == [1.0, 0.0]  # steps 1-2: one flip in one pair
    assert history["disorder"][2][0] == pytest.approx(1 / 3, abs=1e-4)
    assert history["conflict"][2][0] == 0.5  # steps 3-6: (+,-) (+,-) (+,+) (-,-)
    assert history["disorder"][2][1] == 0.0 and history["conflict"][2][1] == 0.0


def test_gap_reading_compares_task_with_perturbed_minus_clean():
    toy = Toy(window=2, every=2, smooth="gap")
    # b: g = +3, g_p = +7 -> gap +4 agrees; a: g = (+2, +1), g_p = (-5, -1) -> gap -7 disagrees
    toy.step(P, P, N, P)
    toy.step(P, P, N, P)
    assert toy.gaqat.history["conflict"][0] == [1.0, 0.0]


def frozen_step(**options):
    """Steady task signs for quantizer a (disorder 0: frozen), alternating for b (disorder 1: free)."""
    toy = Toy(window=4, every=4, tau=0.2, **options)
    for task_b in (P, N, P, N):
        grads = toy.step(P, task_b, N, P)
    assert toy.gaqat.frozen.tolist() == [True, False]
    return grads


@pytest.mark.parametrize("options, expected_a", [
    ({}, lambda g, gp: 0.5 * gp),  # default: drop the task term of d = g/2 + g_p/2
    ({"smooth": "gap"}, lambda g, gp: 0.5 * (gp - g)),  # d = g + (g_p - g)/2 -> (g_p - g)/2
    ({"freeze": "smooth"}, lambda g, gp: 0.5 * g),
    ({"freeze": "smooth", "smooth": "gap"}, lambda g, gp: g),
    ({"freeze": "all"}, lambda g, gp: torch.zeros_like(g)),
])
def test_freezing_edits_exactly_the_frozen_component_of_the_frozen_scale(options, expected_a):
    grads = frozen_step(**options)
    g, gp = grads.grad, grads.perturbed_grad
    assert torch.equal(grads.direction[1], expected_a(g[1], gp[1]))
    assert not torch.equal(grads.direction[1], 0.5 * (g[1] + gp[1]))
    # the weight and the free quantizer keep SAGM's direction, bit for bit
    assert torch.equal(grads.direction[0], 0.5 * (g[0] + gp[0]))
    assert torch.equal(grads.direction[2], 0.5 * (g[2] + gp[2]))


def test_frozen_quantizer_unfreezes_when_its_disorder_rises():
    toy = Toy(window=4, every=4, tau=0.2)
    for _ in range(4):
        toy.step(P, N)
    assert toy.gaqat.frozen.tolist() == [True, True]
    for task_a in (N, P, N, P):  # a now flips every step, b stays steady
        grads = toy.step(task_a, N)
    assert toy.gaqat.frozen.tolist() == [False, True]
    assert torch.equal(grads.direction[1], 0.5 * (grads.grad[1] + grads.perturbed_grad[1]))
    assert toy.gaqat.history["frozen"] == [[True, True], [False, True]]


def test_permanent_freezing_never_unfreezes():
    toy = Toy(window=4, every=4, tau=0.2, permanent=True)
    for task_a in (P, P, P, P, N, P, N, P):
        grads = toy.step(task_a, P if len(toy.gaqat.history["step"]) else N)
    assert toy.gaqat.history["frozen"][0][0] and toy.gaqat.history["frozen"][1][0]
    assert torch.equal(grads.direction[1], 0.5 * grads.perturbed_grad[1])


def test_when_high_and_conflict_measure_pick_the_other_side_of_tau():
    toy = Toy(window=4, every=4, tau=0.5, when="high", measure="conflict")
    for _ in range(4):
        toy.step(P, P, N, P)  # a: task and smooth always disagree (conflict 1), b agrees (0)
    assert toy.gaqat.frozen.tolist() == [True, False]


def test_no_decision_before_warmup():
    toy = Toy(window=2, every=2, warmup=5)
    for _ in range(4):
        toy.step(P, P)
    assert toy.gaqat.history["step"] == [] and not toy.gaqat.frozen.any()
    toy.step(P, P), toy.step(P, P)
    assert toy.gaqat.history["step"] == [6]


@pytest.mark.parametrize("options, message", [
    ({"windw": 5}, "unknown gaqat option windw"),
    ({"freeze": "weights"}, "freeze must be one of task, smooth, all"),
    ({"tau": 1.5}, "tau is a fraction"),
    ({"window": 1}, "window must be at least 2"),
    ({"every": 2.5}, "every must be a whole number"),
    ({"permanent": "yes"}, "permanent must be true or false"),
    ({"tau": "low"}, "tau must be a number"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(QtoolError, match=message):
        GAQATConfig.from_options(options)


def test_state_dict_resumes_the_same_decisions():
    sequence = [(P, N), (P, P), (N, P), (P, P), (P, N), (N, N), (P, P), (N, P), (P, N), (P, P)]
    straight, resumed = Toy(window=4, every=3), Toy(window=4, every=3)
    for task_a, task_b in sequence[:5]:
        straight.step(task_a, task_b)
    buffer = io.BytesIO()
    torch.save(straight.gaqat.state_dict(), buffer)
    buffer.seek(0)
    resumed.gaqat.load_state_dict(torch.load(buffer, weights_only=True))  # what a checkpoint does
    for task_a, task_b in sequence[5:]:
        straight.step(task_a, task_b)
        resumed.step(task_a, task_b)
    assert resumed.gaqat.report() == straight.gaqat.report()
    assert len(straight.gaqat.history["step"]) == 3

    with pytest.raises(QtoolError, match="different gaqat options"):
        Toy(window=5).gaqat.load_state_dict(straight.gaqat.state_dict())


# -- on real models with the real SAGM step ----------------------------------------------------

def train_with_recorded_grads(model, scales, inputs, labels, steps, **options):
    """SAGM + GAQAT; a hook registered before GAQAT keeps what SAGM computed, so each step's
    final gradients can be compared with the untouched ones."""
    optimizer = SAGM(torch.optim.Adam(model.parameters(), lr=1e-4))  # small: tiny scales must stay positive
    seen = []
    optimizer.hooks.append(lambda g: seen.append(([t.clone() for t in g.grad], [t.clone() for t in g.perturbed_grad])))
    gaqat = GAQAT(scales, GAQATConfig.from_options(options))
    optimizer.hooks.append(gaqat)

    def loss_fn(perturbed):
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits

    position = {id(p): i for i, p in enumerate(optimizer.params)}
    scale_ids = {id(s.parameter) for s in scales}
    edited = 0
    for _ in range(steps):
        optimizer.step(loss_fn)
        grad, perturbed = seen[-1]
        frozen = {scales[i].quantizer for i in range(len(scales)) if gaqat.frozen[gaqat.members[i]]}
        for p in optimizer.params:
            i = position[id(p)]
            sagm = 0.5 * (grad[i] + perturbed[i])
            quantizer = next((s.quantizer for s in scales if s.parameter is p), None)
            if quantizer in frozen:
                assert torch.equal(p.grad, 0.5 * perturbed[i])
                edited += int(not torch.allclose(p.grad, sagm))
            else:
                assert torch.equal(p.grad, sagm), "a weight or a free scale was edited"
        assert scale_ids <= set(position)
    return gaqat, edited


def test_gaqat_on_a_qtool_model_with_sagm():
    from qtool.quant.prepare import prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = prepare(model, bits=4)
    inputs, labels = torch.randn(8, 3, 10, 10), torch.randint(0, 10, (8,))
    gaqat, edited = train_with_recorded_grads(model, scale_parameters(model), inputs, labels, steps=6,
                                              window=3, every=3, tau=0.9)
    # 3 weight quantizers and 4 tensor quantizers (input, the two ReLU outputs, the pooled features)
    assert len(gaqat.quantizers) == 7 and len(gaqat.history["step"]) == 2 and edited > 0


def test_gaqat_on_a_brevitas_model_with_parameter_scaling():
    from test_scales import brevitas_model

    torch.manual_seed(0)
    model = brevitas_model()
    scales = scale_parameters(model)
    inputs, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    gaqat, edited = train_with_recorded_grads(model, scales, inputs, labels, steps=6, window=3, every=3, tau=0.9)
    assert gaqat.quantizers == [s.quantizer for s in scales]
    assert edited > 0  # Brevitas scale gradients were really edited
    assert len(gaqat.report()["gaqat"]["conflict"][0]) == len(scales)


# -- the CLI end to end -------------------------------------------------------------------------

def quantize_args(tmp_path, *extra):
    return ["quantize", "dg-cnn", "--target-domain", "0", "--bits", "4", "--method", "gaqat",
            "--steps", "8", "--pretrain-epochs", "0.05", "--batch-size", "32", "--evals", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--threads", "1", *extra]


def test_quantize_gaqat_writes_report_keys_and_heatmap(tmp_path):
    main(quantize_args(tmp_path, "-O", "window=4", "-O", "every=4", "-O", "tau=0.5"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    gaqat = report["gaqat"]
    assert report["method"] == "gaqat" and report["steps"] == 8
    assert gaqat["every"] == 4 and gaqat["check_steps"] == [4, 8]
    # 5 weight quantizers; 10 tensor quantizers: input, 4 ReLU outputs, 4 GroupNorm outputs, pooled features
    assert len(gaqat["layers"]) == 15
    for key in ("conflict", "disorder"):
        assert len(gaqat[key]) == 2 and all(len(row) == 15 for row in gaqat[key])
        assert all(0.0 <= v <= 1.0 for row in gaqat[key] for v in row)
    assert all(isinstance(v, bool) for row in gaqat["frozen"] for v in row)
    assert gaqat["frozen"] == [[d < 0.5 for d in row] for row in gaqat["disorder"]]
    assert (tmp_path / "run" / "gaqat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # by depth: the input's quantizer first, each weight quantizer right before its layer's output
    depth = gaqat["depth_order"]
    assert sorted(depth) == sorted(gaqat["layers"]) and depth != gaqat["layers"]
    assert depth[:2] == ["qtool_act.x", gaqat["layers"][0]] and depth[-1] == gaqat["layers"][4]  # the classifier


def test_bad_gaqat_option_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(tmp_path, "-O", "tua=0.1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown gaqat option tua") and "\n" not in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "report.json").exists()


def test_gaqat_on_a_full_precision_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(quantize_args(tmp_path, "--bits", "32"))
    assert "gaqat needs learned quantizer scales" in capsys.readouterr().err


# -- freeze=layer (FQAT's layer-wise variant) ----------------------------------------------------

class LayerToy:
    """Layer "one" (weight + quantizers one.w, one.a), layer "two" (weight + quantizer two.w) and a
    tensor quantizer "act.x" outside any layer (its own unit), with task-gradient signs we choose."""

    def __init__(self, device="cpu", **options):
        make = lambda n: nn.Parameter(torch.ones(n, device=device))  # noqa: E731
        self.w1, self.s1w, self.s1a, self.w2, self.s2w, self.sx = make(3), make(2), make(1), make(2), make(1), make(1)
        self.params = [self.w1, self.s1w, self.s1a, self.w2, self.s2w, self.sx]
        scales = [ScaleParameter("one.w", "one", "one.w.scale", self.s1w), ScaleParameter("one.a", "one", "one.a.scale", self.s1a),
                  ScaleParameter("two.w", "two", "two.w.scale", self.s2w), ScaleParameter("act.x", "act", "act.x.scale", self.sx)]
        layers = {"one": [self.w1, self.s1w, self.s1a], "two": [self.w2, self.s2w]}
        self.gaqat = GAQAT(scales, GAQATConfig.from_options({"freeze": "layer", **options}), layers)

    def step(self, one, two, x):
        """Task-gradient signs of the quantizers of layer one (both), layer two and act.x."""
        signs = [P, one, one, P, two, x]
        grad = [sign * torch.ones_like(p) for sign, p in zip(signs, self.params)]
        perturbed = [torch.full_like(p, 0.5) for p in self.params]
        grads = TwoPassGrads(self.params, grad, perturbed, [0.5 * (g + gp) for g, gp in zip(grad, perturbed)], 1.0, 1.1)
        self.gaqat(grads)
        return grads


def test_freeze_layer_fills_fqat_defaults_unless_given():
    config = GAQATConfig.from_options({"freeze": "layer", "window": 8})
    assert (config.every, config.when, config.tau, config.warmup) == (1, "high", 0.6, 8)
    config = GAQATConfig.from_options({"freeze": "layer", "tau": 0.3, "every": 2, "warmup": 0})
    assert (config.every, config.tau, config.warmup) == (2, 0.3, 0)


def test_freeze_layer_withholds_whole_unstable_layers_every_step():
    toy = LayerToy(window=4)
    assert toy.gaqat.units == ["one", "two", "act.x"]
    flips = [P, N, P, N, P, N]
    for step, sign in enumerate(flips):  # layer one flips every step, two and act.x are steady
        grads = toy.step(sign, P, P)
        if step < 3:  # warmup = window: no decision before the window is full
            assert toy.gaqat.decisions == 0 and all(d is not None for d in grads.direction)
    assert toy.gaqat.decisions == 3  # steps 4, 5, 6: decided every step
    assert toy.gaqat.frozen.tolist() == [True, False, False]
    # layer one's weight and both its scales get no gradient; the rest keep SAGM's direction
    assert grads.direction[:3] == [None, None, None]
    for i in (3, 4, 5):
        assert torch.equal(grads.direction[i], 0.5 * (grads.grad[i] + grads.perturbed_grad[i]))
    # layer one steadies: re-decided every step from the window, it unfreezes as soon as the
    # window's flips fall to tau (N P N P: 1, P N P P: 2/3, N P P P: 1/3)
    for frozen in (True, True, False):
        grads = toy.step(P, P, P)
        assert toy.gaqat.frozen.tolist() == [frozen, False, False]
    assert all(d is not None for d in grads.direction)
    report = toy.gaqat.report()["gaqat"]
    assert report["unit"] == "layer" and report["decisions"] == 6
    assert report["frozen_share"] == [5 / 6, 0.0, 0.0] and report["frozen_fraction"] == pytest.approx(5 / 18)
    # per-step decisions are recorded once per window; rows stay per quantizer
    assert report["check_steps"] == [4, 8] and report["frozen"][0] == [True, True, False, False]


def test_a_layer_is_judged_by_the_mean_of_its_quantizers():
    toy = LayerToy(window=3, tau=0.6)
    for sign in (P, N, P):  # one.w and one.a both flip: 1.0; act.x flips too; two is steady
        toy.step(sign, P, sign)
    assert toy.gaqat.frozen.tolist() == [True, False, True]
    assert toy.gaqat._per_unit(torch.tensor([1.0, 0.0, 0.5, 0.25])).tolist() == [0.5, 0.5, 0.25]


def test_frozen_layer_is_not_stepped_by_adam_on_a_qtool_model():
    from qtool.train.gaqat import _weighted_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    from qtool.quant.prepare import prepare

    model = prepare(model, bits=4)
    inputs, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    model(inputs)
    scales = scale_parameters(model)
    layers = _weighted_layers(model, scales)
    assert set(layers) == {"0", "3"}
    optimizer = SAGM(torch.optim.Adam(model.parameters(), lr=1e-2))
    # measure below 1.01: every layer is frozen from the first decision (step 2, a full window) on
    gaqat = GAQAT(scales, GAQATConfig(freeze="layer", window=2, every=1, when="low", tau=1.01, warmup=2), layers)
    optimizer.hooks.append(gaqat)

    def loss_fn(perturbed):
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits

    optimizer.step(loss_fn)
    optimizer.step(loss_fn)  # the first decision (full window) freezes both layers at step 2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adam_steps = {name: float(optimizer.base.state[p]["step"]) for name, p in model.named_parameters()}
    optimizer.step(loss_fn)
    assert all(gaqat.frozen.tolist())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} moved while its layer was frozen"
        assert float(optimizer.base.state[p]["step"]) == adam_steps[name]


# -- devices: every GAQAT tensor lives where the scales live ---------------------------------------

def test_hook_keeps_its_state_on_the_scales_device_meta():
    toy = Toy(window=4, every=1000)  # no decision: meta tensors have no values to decide from
    for name in ("weight", "scale_a", "scale_b"):
        setattr(toy, name, nn.Parameter(getattr(toy, name).to("meta")))
    toy.params = [toy.weight, toy.scale_a, toy.scale_b]
    scales = [ScaleParameter("a", "", "a.scale", toy.scale_a), ScaleParameter("b", "", "b.scale", toy.scale_b)]
    toy.gaqat = GAQAT(scales, GAQATConfig(window=4, every=1000))
    grad = [torch.ones_like(p) for p in toy.params]
    grads = TwoPassGrads(toy.params, grad, grad, list(grad), 1.0, 1.0)
    for _ in range(3):
        toy.gaqat(grads)
    state = toy.gaqat
    for tensor in (state.task_signs, state.smooth_signs, state.frozen, state._members, state._unit_of):
        assert tensor.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layer_wise", [False, True])
def test_hook_decides_and_edits_on_cuda(layer_wise):
    if layer_wise:
        toy = LayerToy(device="cuda", window=4)
        for sign in (P, N, P, N, P):
            grads = toy.step(sign, P, P)
        assert toy.gaqat.frozen.device.type == "cuda" and toy.gaqat.frozen.tolist() == [True, False, False]
        assert grads.direction[0] is None and grads.direction[3].device.type == "cuda"
    else:
        toy = Toy(window=4, every=4, tau=0.2)
        toy.params = [nn.Parameter(p.detach().cuda()) for p in toy.params]
        scales = [ScaleParameter("a", "", "a.scale", toy.params[1]), ScaleParameter("b", "", "b.scale", toy.params[2])]
        toy.gaqat = GAQAT(scales, GAQATConfig(window=4, every=4, tau=0.2))
        for task_b in (P, N, P, N):
            grad = [torch.tensor([0.3, -0.2, 0.5]), torch.tensor([2.0, 1.0]), torch.tensor([3.0 * task_b])]
            grad = [g.cuda() for g in grad]
            grads = TwoPassGrads(toy.params, grad, [-g for g in grad], [torch.zeros_like(g) for g in grad], 1.0, 1.0)
            toy.gaqat(grads)
        assert toy.gaqat.task_signs.device.type == "cuda" and toy.gaqat.frozen.tolist() == [True, False]
        assert torch.equal(grads.direction[1], -0.5 * grad[1])
    assert toy.gaqat.state_dict()["task_signs"].device.type == "cpu"  # checkpoints load anywhere


def test_measure_plot_and_report_over_the_run(tmp_path):
    toy = Toy(window=4, every=2)
    for task_a in (P, N, P, P, N, P):
        toy.step(task_a, P, N)
    paths = toy.gaqat.write_artifacts(tmp_path)
    assert [p.name for p in paths] == ["gaqat.png", "gaqat-measures.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    report = toy.gaqat.report()["gaqat"]
    assert len(report["disorder"]) == len(report["conflict"]) == len(report["check_steps"]) == 3
    assert report["unit"] == "quantizer" and report["units"] == ["a", "b"]
