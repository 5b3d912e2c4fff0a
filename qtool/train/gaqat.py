"""GAQAT: gradient-adaptive QAT for domain generalization (Jiang et al., arXiv:2412.05551).

Under SAGM every quantizer scale ``s`` receives two gradients per step: ``g_task`` from the
clean loss and ``g_smooth`` from the flatness term. When they disagree, the scale is pulled two
ways. GAQAT watches the sign of both per quantizer over a window of ``n`` steps and, every ``K``
steps, re-decides per quantizer whether to drop one component from the scale's update direction:

    disorder  D = fraction of consecutive steps in the window where sign(g_task) flips
    conflict  C = fraction of steps in the window where sign(g_task) != sign(g_smooth)
    default:  freeze g_task where D < tau (a persistent task pull that holds the scale in a
              "suboptimal equilibrium" against the flatness pull); re-decided every K steps.

SAGM's update direction is ``d = (g + g_p) / 2``. With ``smooth=perturbed`` (default) the
components are ``g_task = g``, ``g_smooth = g_p`` and ``d = g_task/2 + g_smooth/2``; with
``smooth=gap`` they are ``g_task = g``, ``g_smooth = g_p - g`` and ``d = g_task + g_smooth/2``.
Freezing a component removes its term from ``d`` for that quantizer's scales only; weights and
the other scales keep SAGM's direction. Adam then steps with the edited direction (so a fully
frozen scale still coasts on Adam's momentum, as in any direction-editing hook).

The paper's method section is not public; every reading that is not certain is an option
(see docs/GAQAT.md and docs/research notes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.plots import write_heatmap
from qtool.quant.scales import ScaleParameter, scale_parameters
from qtool.train.methods import Method, register
from qtool.train.optim import SAGM, TwoPassGrads

CHOICES = {
    "freeze": ("task", "smooth", "all"),
    "when": ("low", "high"),
    "measure": ("disorder", "conflict"),
    "smooth": ("perturbed", "gap"),
}


@dataclass(frozen=True)
class GAQATConfig:
    window: int = 20  # n: steps of sign history behind each measure
    every: int = 20  # K: steps between freeze decisions
    tau: float = 0.2  # threshold on the measure, in [0, 1]
    freeze: str = "task"  # which component of the scale gradient a frozen quantizer drops
    when: str = "low"  # freeze where the measure is below (low) or above (high) tau
    measure: str = "disorder"  # disorder of g_task, or task/smooth sign conflict
    smooth: str = "perturbed"  # g_smooth = g_p (perturbed) or g_p - g (gap)
    permanent: bool = False  # once frozen, stay frozen
    warmup: int = 0  # no decisions before this step

    @classmethod
    def from_options(cls, options: dict) -> "GAQATConfig":
        """Validate ``-O KEY=VALUE`` options; a mistake is one QtoolError line."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise QtoolError(f"unknown gaqat option {', '.join(unknown)}; valid options: {', '.join(known)}")
        values = {}
        for key, value in options.items():
            default = known[key].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise QtoolError(f"gaqat option {key} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise QtoolError(f"gaqat option {key} must be a number, got {value!r}")
                if isinstance(default, int) and value != int(value):
                    raise QtoolError(f"gaqat option {key} must be a whole number, got {value!r}")
                value = type(default)(value)
            elif value not in CHOICES[key]:
                raise QtoolError(f"gaqat option {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
            values[key] = value
        config = cls(**values)
        if config.window < 2:
            raise QtoolError(f"gaqat option window must be at least 2 (a flip needs two steps), got {config.window}")
        if config.every < 1 or config.warmup < 0:
            raise QtoolError("gaqat options every must be at least 1 and warmup at least 0")
        if not 0.0 <= config.tau <= 1.0:
            raise QtoolError(f"gaqat option tau is a fraction of steps, in [0, 1]; got {config.tau}")
        return config


def disorder(signs: torch.Tensor) -> torch.Tensor:
    """Per column of ``signs`` (steps x quantizers, oldest first, values -1/0/+1): the fraction of
    consecutive pairs whose signs are opposite. A zero (no gradient) flips nothing."""
    flips = (signs[1:] * signs[:-1]) < 0
    return flips.float().mean(dim=0)


def conflict(task_signs: torch.Tensor, smooth_signs: torch.Tensor) -> torch.Tensor:
    """Per column: the fraction of steps where the task and smoothness gradients disagree in sign."""
    return ((task_signs * smooth_signs) < 0).float().mean(dim=0)


class GAQAT:
    """The optimizer hook (``optimizer.hooks.append(gaqat)``) and the trainer callback in one.

    The decision unit is a quantizer: the weight and the input quantizer of a layer are judged
    separately, because their scales live in different units and are pulled by different terms.
    A quantizer's gradient sign is the sign of the sum of its scale gradient (over channels).
    """

    def __init__(self, scales: list[ScaleParameter], config: GAQATConfig = GAQATConfig()):
        if not scales:
            raise QtoolError("gaqat needs learned quantizer scales, and this model has none "
                             "(is it full precision? use --bits 2, 3, 4 or 8)")
        self.config = config
        self.quantizers: list[str] = list(dict.fromkeys(s.quantizer for s in scales))
        position = {name: i for i, name in enumerate(self.quantizers)}
        self.members = [position[s.quantizer] for s in scales]  # scale -> its quantizer
        self._members = torch.tensor(self.members)
        self.scales = [s.parameter for s in scales]
        self._index: list[int] | None = None  # scale -> position in the optimizer's params

        count = len(self.quantizers)
        self.step = 0
        self.task_signs = torch.zeros(config.window, count, dtype=torch.int8)
        self.smooth_signs = torch.zeros(config.window, count, dtype=torch.int8)
        self.frozen = torch.zeros(count, dtype=torch.bool)
        self.history: dict[str, list] = {"step": [], "disorder": [], "conflict": [], "frozen": []}

    # -- the hook -----------------------------------------------------------------------------
    def __call__(self, grads: TwoPassGrads) -> None:
        index = self._positions(grads.params)
        task = self._per_quantizer([grads.grad[i] for i in index])
        perturbed = self._per_quantizer([grads.perturbed_grad[i] for i in index])
        smooth = perturbed - task if self.config.smooth == "gap" else perturbed
        row = self.step % self.config.window
        self.task_signs[row] = torch.sign(task).to(torch.int8)
        self.smooth_signs[row] = torch.sign(smooth).to(torch.int8)
        self.step += 1
        config = self.config
        if self.step >= max(config.warmup, 2) and self.step % config.every == 0:
            self.decide()
        if self.frozen.any():
            self._edit(grads, index)

    def _positions(self, params: list[torch.nn.Parameter]) -> list[int]:
        """Where each scale sits in the optimizer's parameter list (looked up once)."""
        if self._index is None or any(params[i] is not p for i, p in zip(self._index, self.scales)):
            where = {id(p): i for i, p in enumerate(params)}
            missing = [i for i, p in enumerate(self.scales) if id(p) not in where]
            if missing:
                raise ValueError(f"quantizer {self.quantizers[self.members[missing[0]]]} has a scale the optimizer does not train")
            self._index = [where[id(p)] for p in self.scales]
        return self._index

    def _per_quantizer(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        totals = torch.zeros(len(self.quantizers), dtype=torch.float64)
        sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors])
        return totals.index_add_(0, self._members, sums)

    def _window(self, signs: torch.Tensor) -> torch.Tensor:
        """The recorded rows, oldest first."""
        filled = min(self.step, self.config.window)
        if filled < self.config.window:
            return signs[:filled]
        return torch.roll(signs, -(self.step % self.config.window), dims=0)

    def measures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(disorder of g_task, task/smooth conflict) per quantizer over the current window."""
        task, smooth = self._window(self.task_signs), self._window(self.smooth_signs)
        return disorder(task), conflict(task, smooth)

    def decide(self) -> None:
        """Re-decide which quantizers are frozen, and record the check."""
        config = self.config
        disorder_now, conflict_now = self.measures()
        value = disorder_now if config.measure == "disorder" else conflict_now
        frozen = value < config.tau if config.when == "low" else value > config.tau
        self.frozen = frozen | self.frozen if config.permanent else frozen
        self.history["step"].append(self.step)
        self.history["disorder"].append([round(float(v), 4) for v in disorder_now])
        self.history["conflict"].append([round(float(v), 4) for v in conflict_now])
        self.history["frozen"].append([bool(v) for v in self.frozen])

    def _edit(self, grads: TwoPassGrads, index: list[int]) -> None:
        """Replace SAGM's direction ``task_part + smooth_part`` of the frozen quantizers' scales by
        the part that is kept (computed from g and g_p directly, so nothing is lost to cancellation)."""
        freeze, gap = self.config.freeze, self.config.smooth == "gap"
        frozen = self.frozen.tolist()
        for scale, position in enumerate(index):
            if not frozen[self.members[scale]]:
                continue
            g, g_p = grads.grad[position], grads.perturbed_grad[position]
            if freeze == "task":
                kept = 0.5 * (g_p - g) if gap else 0.5 * g_p
            elif freeze == "smooth":
                kept = g if gap else 0.5 * g
            else:
                kept = torch.zeros_like(g)
            grads.direction[position] = kept

    # -- the callback ---------------------------------------------------------------------------
    def report(self) -> dict:
        checks = len(self.history["step"])
        frozen_share = [sum(row) / len(row) for row in self.history["frozen"]]
        return {"gaqat": {
            "layers": self.quantizers,
            "conflict": self.history["conflict"],
            "disorder": self.history["disorder"],
            "frozen": self.history["frozen"],
            "check_steps": self.history["step"],
            "every": self.config.every,
            "frozen_fraction": sum(frozen_share) / checks if checks else 0.0,
            "config": asdict(self.config),
        }}

    def write_artifacts(self, out_dir: str | Path) -> Path:
        """``gaqat.png``: the deciding measure per quantizer (rows) and check (columns), frozen cells dotted."""
        config = self.config
        measure = {"disorder": "disorder of g_task", "conflict": "sign conflict of g_task and g_smooth"}[config.measure]
        frozen = {"task": "g_task frozen", "smooth": "g_smooth frozen", "all": "scale frozen"}[config.freeze]
        rule = f"{config.measure} {'<' if config.when == 'low' else '>'} {config.tau}"
        return write_heatmap(
            Path(out_dir) / "gaqat.png", self.history[config.measure], self.quantizers,
            [str(step) for step in self.history["step"]], self.history["frozen"],
            title=f"GAQAT: {measure} per quantizer (window {config.window} steps)\n"
                  f"red dots: {frozen} ({rule}{', permanent' if config.permanent else ''})",
            colorbar=config.measure, xlabel="training step of the check",
        )

    def state_dict(self) -> dict:
        return {
            "quantizers": list(self.quantizers), "config": asdict(self.config), "step": self.step,
            "task_signs": self.task_signs.clone(), "smooth_signs": self.smooth_signs.clone(),
            "frozen": self.frozen.clone(), "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["quantizers"] != self.quantizers:
            raise QtoolError("the checkpoint's GAQAT state belongs to a model with different quantizers")
        if state["config"] != asdict(self.config):
            raise QtoolError("the checkpoint's GAQAT state was made with different gaqat options: "
                             f"{state['config']} (now {asdict(self.config)})")
        self.step = int(state["step"])
        self.task_signs.copy_(state["task_signs"])
        self.smooth_signs.copy_(state["smooth_signs"])
        self.frozen = state["frozen"].clone()
        self.history = {k: list(v) for k, v in state["history"].items()}


def setup(model, trainer, options: dict) -> list:
    """``Method.setup``: attach GAQAT to the trainer's SAGM optimizer; return it as a callback."""
    config = GAQATConfig.from_options(options)
    if not isinstance(trainer.optimizer, SAGM):
        raise QtoolError("gaqat edits SAGM's two-pass direction; it needs the sagm optimizer")
    gaqat = GAQAT(scale_parameters(model), config)
    trainer.optimizer.hooks.append(gaqat)
    return [*trainer.callbacks, gaqat]


register(Method("gaqat", "sagm", "LSQ QAT with SAGM and GAQAT's selective freezing of scale gradients",
                setup=setup, check_options=GAQATConfig.from_options))
