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
    assert len(gaqat.quantizers) == 6 and len(gaqat.history["step"]) == 2 and edited > 0


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
    assert len(gaqat["layers"]) == 10  # 5 quantized layers x (weight, input) quantizers
    for key in ("conflict", "disorder"):
        assert len(gaqat[key]) == 2 and all(len(row) == 10 for row in gaqat[key])
        assert all(0.0 <= v <= 1.0 for row in gaqat[key] for v in row)
    assert all(isinstance(v, bool) for row in gaqat["frozen"] for v in row)
    assert gaqat["frozen"] == [[d < 0.5 for d in row] for row in gaqat["disorder"]]
    assert (tmp_path / "run" / "gaqat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
