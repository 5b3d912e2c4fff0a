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

``freeze=layer`` is the layer-wise variant of the authors' follow-up, FQAT (arXiv:2509.00859,
"disorder-guided adaptive freezing ... which layers to freeze at each training step"): the unit
is a layer (its quantizers' measures averaged), the decision is re-made every step from the
window, and a frozen layer (weights, bias and scales) is not stepped at all that step: its
gradient is withheld from Adam, so neither its value nor Adam's moments move. Its defaults
(``LAYER_DEFAULTS``) freeze the unstable layers, those whose g_task flips more than chance.

The papers' method sections are not public; every reading that is not certain is an option
(see docs/GAQAT.md).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.options import check_method_options
from qtool.plots import Panel, write_heatmap, write_panels
from qtool.quant.scales import ScaleParameter, scale_parameters, watch_execution_order
from qtool.train.methods import Method, register
from qtool.train.optim import SAGM, TwoPassGrads

CHOICES = {
    "freeze": ("task", "smooth", "all", "layer"),
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

    @property
    def layer_wise(self) -> bool:
        return self.freeze == "layer"

    @classmethod
    def from_options(cls, options: dict) -> "GAQATConfig":
        """Validate ``-O KEY=VALUE`` options; a mistake is one QtoolError line. ``freeze=layer``
        fills the options it was not given from ``LAYER_DEFAULTS``."""
        values = check_method_options(cls, options, "gaqat", CHOICES)
        if values.get("freeze") == "layer":
            window = values.get("window", cls.window)
            values = {**LAYER_DEFAULTS, "warmup": window, **values}
        config = cls(**values)
        if config.window < 2:
            raise QtoolError(f"gaqat option window must be at least 2 (a flip needs two steps), got {config.window}")
        if config.every < 1 or config.warmup < 0:
            raise QtoolError("gaqat options every must be at least 1 and warmup at least 0")
        if not 0.0 <= config.tau <= 1.0:
            raise QtoolError(f"gaqat option tau is a fraction of steps, in [0, 1]; got {config.tau}")
        return config


# freeze=layer (FQAT): decide every step, from a full window, and freeze the layers whose g_task
# flips in more than 60 % of consecutive steps (random signs: 50 %, about 18 % of random windows
# of 20 steps exceed 60 %).
LAYER_DEFAULTS = {"every": 1, "when": "high", "tau": 0.6}


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
    With ``freeze=layer`` the unit is a layer of ``layers`` (layer name -> its parameters, which
    freezing it withholds): the mean of its quantizers' measures decides. A quantizer whose layer
    is not in ``layers`` (a tensor quantizer of graph placement, between layers) is a unit alone.

    Every tensor of the state lives on the scales' device and follows them when the model moves;
    a step makes no host round trip (the decisions are copied to Python once, when made).
    """

    def __init__(self, scales: list[ScaleParameter], config: GAQATConfig = GAQATConfig(),
                 layers: dict[str, list[torch.nn.Parameter]] | None = None):
        if not scales:
            raise QtoolError("gaqat needs learned quantizer scales, and this model has none "
                             "(is it full precision? use --bits 2, 3, 4 or 8)")
        self.config = config
        self.quantizers: list[str] = list(dict.fromkeys(s.quantizer for s in scales))
        position = {name: i for i, name in enumerate(self.quantizers)}
        self.members = [position[s.quantizer] for s in scales]  # scale -> its quantizer
        self.scales = [s.parameter for s in scales]
        layers = layers or {}
        unit_name = {s.quantizer: s.layer if config.layer_wise and s.layer in layers else s.quantizer for s in scales}
        self.units = list(dict.fromkeys(unit_name[q] for q in self.quantizers))
        unit_position = {name: i for i, name in enumerate(self.units)}
        self.unit_of = [unit_position[unit_name[q]] for q in self.quantizers]  # quantizer -> unit
        self.unit_params = self._unit_parameters(scales, layers, unit_name) if config.layer_wise else []
        self._index: list[int] | None = None  # scale -> position in the optimizer's params
        self._unit_index: list[list[int]] = []  # unit -> positions of the parameters freezing it withholds

        device = self.scales[0].device
        count = len(self.quantizers)
        self.step = 0
        self.task_signs = torch.zeros(config.window, count, dtype=torch.int8, device=device)
        self.smooth_signs = torch.zeros(config.window, count, dtype=torch.int8, device=device)
        self.frozen = torch.zeros(len(self.units), dtype=torch.bool, device=device)
        self._members = torch.tensor(self.members, device=device)
        self._unit_of = torch.tensor(self.unit_of, device=device)
        self._frozen_now = [False] * len(self.units)  # self.frozen on the host
        self.decisions = 0
        self.frozen_counts = [0] * len(self.units)  # per unit: decisions that froze it
        self.history: dict[str, list] = {"step": [], "disorder": [], "conflict": [], "frozen": []}
        self.depth_order: list[str] = []  # the quantizers in network depth, once a forward pass showed it
        self._stop_watching = None

    def watch_depth(self, model) -> None:
        """Learn the quantizers' network depth from the first training forward pass (for the
        report's by-depth views; registration order puts every tensor quantizer last)."""
        self.depth_order, self._stop_watching = watch_execution_order(model)

    def _unit_parameters(self, scales: list[ScaleParameter], layers: dict, unit_name: dict) -> list[list]:
        """Per unit, what freezing it withholds: the layer's parameters and its quantizers' scales."""
        params = {unit: list(layers.get(unit, [])) for unit in self.units}
        for s in scales:
            unit = params[unit_name[s.quantizer]]
            if not any(p is s.parameter for p in unit):
                unit.append(s.parameter)
        return [params[unit] for unit in self.units]

    # -- the hook -----------------------------------------------------------------------------
    def __call__(self, grads: TwoPassGrads) -> None:
        if self._stop_watching is not None:  # a forward pass has run: the depth order is known
            self._stop_watching()
            self._stop_watching = None
        index = self._positions(grads.params)
        self._follow(grads.grad[index[0]].device)
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
        if any(self._frozen_now):
            self._withhold(grads) if config.layer_wise else self._edit(grads, index)

    def _positions(self, params: list[torch.nn.Parameter]) -> list[int]:
        """Where each scale (and each parameter a frozen layer withholds) sits in the optimizer's
        parameter list (looked up once)."""
        if self._index is None or any(params[i] is not p for i, p in zip(self._index, self.scales)):
            where = {id(p): i for i, p in enumerate(params)}
            missing = [i for i, p in enumerate(self.scales) if id(p) not in where]
            if missing:
                raise ValueError(f"quantizer {self.quantizers[self.members[missing[0]]]} has a scale the optimizer does not train")
            self._index = [where[id(p)] for p in self.scales]
            # a layer parameter the optimizer does not train has nothing to withhold
            self._unit_index = [[where[id(p)] for p in unit if id(p) in where] for unit in self.unit_params]
        return self._index

    def _follow(self, device: torch.device) -> None:
        """Move the state to the gradients' device (a model moved after GAQAT was built)."""
        if self.task_signs.device != device:
            for name in ("task_signs", "smooth_signs", "frozen", "_members", "_unit_of"):
                setattr(self, name, getattr(self, name).to(device))

    def _per_quantizer(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors])
        totals = torch.zeros(len(self.quantizers), dtype=torch.float64, device=sums.device)
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

    def _per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """A per-quantizer measure per decision unit: a layer's is the mean over its quantizers."""
        if not self.config.layer_wise:
            return values
        totals = torch.zeros(len(self.units), dtype=values.dtype, device=values.device).index_add_(0, self._unit_of, values)
        counts = torch.zeros_like(totals).index_add_(0, self._unit_of, torch.ones_like(values))
        return totals / counts

    def decide(self) -> None:
        """Re-decide which units are frozen, and record the check (with per-step decisions,
        ``freeze=layer``, one check per window, so report.json stays small)."""
        config = self.config
        disorder_now, conflict_now = self.measures()
        value = self._per_unit(disorder_now if config.measure == "disorder" else conflict_now)
        frozen = value < config.tau if config.when == "low" else value > config.tau
        self.frozen = frozen | self.frozen if config.permanent else frozen
        self._frozen_now = self.frozen.tolist()
        self.decisions += 1
        self.frozen_counts = [count + frozen for count, frozen in zip(self.frozen_counts, self._frozen_now)]
        gap = config.window if config.layer_wise else 1
        if not self.history["step"] or self.step - self.history["step"][-1] >= gap:
            self.history["step"].append(self.step)
            self.history["disorder"].append([round(v, 4) for v in disorder_now.tolist()])
            self.history["conflict"].append([round(v, 4) for v in conflict_now.tolist()])
            self.history["frozen"].append([self._frozen_now[unit] for unit in self.unit_of])  # per quantizer

    def _edit(self, grads: TwoPassGrads, index: list[int]) -> None:
        """Replace SAGM's direction ``task_part + smooth_part`` of the frozen quantizers' scales by
        the part that is kept (computed from g and g_p directly, so nothing is lost to cancellation)."""
        freeze, gap = self.config.freeze, self.config.smooth == "gap"
        for scale, position in enumerate(index):
            if not self._frozen_now[self.members[scale]]:
                continue
            g, g_p = grads.grad[position], grads.perturbed_grad[position]
            if freeze == "task":
                kept = 0.5 * (g_p - g) if gap else 0.5 * g_p
            elif freeze == "smooth":
                kept = g if gap else 0.5 * g
            else:
                kept = torch.zeros_like(g)
            grads.direction[position] = kept

    def _withhold(self, grads: TwoPassGrads) -> None:
        """``freeze=layer``: a frozen layer's parameters get no gradient (None), so the base
        optimizer skips them this step: no update, Adam's moments untouched (a zero direction
        would still move them on momentum)."""
        for unit, frozen in enumerate(self._frozen_now):
            if frozen:
                for position in self._unit_index[unit]:
                    grads.direction[position] = None

    # -- the callback ---------------------------------------------------------------------------
    def report(self) -> dict:
        units, decisions = len(self.units), self.decisions
        return {"gaqat": {
            "layers": self.quantizers,  # one row per quantizer in conflict, disorder, frozen
            "depth_order": self._depth(),  # the same quantizers in network depth (empty: unknown)
            "conflict": self.history["conflict"],
            "disorder": self.history["disorder"],
            "frozen": self.history["frozen"],
            "check_steps": self.history["step"],
            "every": self.config.every,
            "frozen_fraction": sum(self.frozen_counts) / (decisions * units) if decisions else 0.0,
            "unit": "layer" if self.config.layer_wise else "quantizer",
            "units": self.units,
            "decisions": decisions,
            "frozen_share": [count / decisions if decisions else 0.0 for count in self.frozen_counts],
            "config": asdict(self.config),
        }}

    def _depth(self) -> list[str]:
        """``depth_order`` when it covers every quantizer, else nothing (no forward pass seen)."""
        return list(self.depth_order) if sorted(self.depth_order) == sorted(self.quantizers) else []

    def write_artifacts(self, out_dir: str | Path) -> list[Path]:
        """``gaqat.png``: the deciding measure per quantizer (rows) and check (columns), frozen cells
        dotted; ``gaqat-measures.png``: disorder and conflict over the run, by depth."""
        config = self.config
        measure = {"disorder": "disorder of g_task", "conflict": "sign conflict of g_task and g_smooth"}[config.measure]
        frozen = {"task": "g_task frozen", "smooth": "g_smooth frozen", "all": "scale frozen",
                  "layer": "layer frozen"}[config.freeze]
        rule = f"{config.measure} {'<' if config.when == 'low' else '>'} {config.tau}"
        rows = by_depth(self.quantizers, self._depth())
        heatmap = write_heatmap(
            Path(out_dir) / "gaqat.png", [[check[i] for i in rows] for check in self.history[config.measure]],
            [self.quantizers[i] for i in rows], [str(step) for step in self.history["step"]],
            [[check[i] for i in rows] for check in self.history["frozen"]],
            title=f"GAQAT: {measure} per quantizer (window {config.window} steps)\n"
                  f"red dots: {frozen} ({rule}{', permanent' if config.permanent else ''})",
            colorbar=config.measure, xlabel="training step of the check",
        )
        return [heatmap, write_measure_plot(Path(out_dir) / "gaqat-measures.png", self.history, config.window, rows)]

    def state_dict(self) -> dict:
        """On the CPU, so a checkpoint loads on any machine."""
        return {
            "quantizers": list(self.quantizers), "config": asdict(self.config), "step": self.step,
            "task_signs": self.task_signs.to("cpu", copy=True), "smooth_signs": self.smooth_signs.to("cpu", copy=True),
            "frozen": self.frozen.to("cpu", copy=True), "history": {k: list(v) for k, v in self.history.items()},
            "decisions": self.decisions, "frozen_counts": list(self.frozen_counts),
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
        self.frozen = state["frozen"].to(self.task_signs.device, copy=True)
        self._frozen_now = self.frozen.tolist()
        self.history = {k: list(v) for k, v in state["history"].items()}
        # checkpoints written before the counters recorded every decision as a check
        self.decisions = int(state.get("decisions", len(self.history["step"])))
        self.frozen_counts = list(state.get("frozen_counts", [sum(column) for column in zip(*self.history["frozen"])]
                                            or [0] * len(self.units)))


def by_depth(quantizers: list[str], depth_order: list[str]) -> list[int]:
    """Indices of ``quantizers`` in network depth; registration order when the depth is unknown."""
    if not depth_order:
        return list(range(len(quantizers)))
    position = {name: i for i, name in enumerate(quantizers)}
    return [position[name] for name in depth_order]


def write_measure_plot(path: Path, history: dict, window: int, depth: list[int] | None = None) -> Path:
    """Disorder of g_task and task/smooth conflict over the run: the median over quantizers and the
    mean of the lower, middle and upper third of the network (``depth``: quantizer indices from
    input to output; registration order without it)."""
    steps = history["step"]
    count = len(history["disorder"][0]) if history["disorder"] else 0
    depth = depth or list(range(count))
    thirds = {"lower third": depth[:count // 3], "middle third": depth[count // 3:2 * count // 3],
              "upper third": depth[2 * count // 3:]}

    def lines(rows: list[list[float]]) -> dict:
        found = {"median": (steps, [statistics.median(row) for row in rows])}
        for name, members in thirds.items():
            if members:
                found[name] = (steps, [statistics.fmean(row[i] for i in members) for row in rows])
        return found

    panels = [Panel(f"disorder of g_task (window {window})", "share of sign flips", lines(history["disorder"])),
              Panel("task/smooth sign conflict", "share of steps with opposite signs", lines(history["conflict"]))]
    return write_panels(path, panels, title="GAQAT measures per quantizer over the run") if steps else path


def _weighted_layers(model, scales: list[ScaleParameter]) -> dict[str, list[torch.nn.Parameter]]:
    """The layers of ``scales`` that hold parameters besides quantizer scales (a conv, a linear),
    with all their parameters; a container of tensor quantizers is no layer."""
    scale_ids = {id(s.parameter) for s in scales}
    found = {}
    for name in dict.fromkeys(s.layer for s in scales):
        params = list(model.get_submodule(name).parameters()) if name else []
        if any(id(p) not in scale_ids for p in params):
            found[name] = params
    return found


def setup(model, trainer, options: dict) -> list:
    """``Method.setup``: attach GAQAT to the trainer's SAGM optimizer; return it as a callback."""
    config = GAQATConfig.from_options(options)
    if not isinstance(trainer.optimizer, SAGM):
        raise QtoolError("gaqat edits SAGM's two-pass direction; it needs the sagm optimizer")
    scales = scale_parameters(model)
    gaqat = GAQAT(scales, config, _weighted_layers(model, scales) if config.layer_wise else None)
    gaqat.watch_depth(model)
    trainer.optimizer.hooks.append(gaqat)
    return [*trainer.callbacks, gaqat]


register(Method("gaqat", "sagm", "LSQ QAT with SAGM and GAQAT's selective freezing of scale gradients",
                setup=setup, check_options=GAQATConfig.from_options))
