"""Binary-network training methods: ``ste`` and ``reste``, and the callback that runs ReSTE's
schedule and logs the paper's two indicators.

* ``o`` follows ReSTE's cosine ramp, updated at the start of every epoch ``e = 0 .. E-1``:
  ``o(e) = 1 + (o_end - 1) (1 - cos(pi/2 * e/E))``. It starts at 1 (STE) and approaches
  ``o_end`` (3) at the end. STE runs keep ``o = 1``.
* Estimating error (how far the estimator is from sign): per binary layer the L2 distance
  ``|| sign(W) - sign(W)|W|^(1/o) ||_2`` over the latent weights at the end of the epoch, with
  the ``o`` the epoch trained with (1 for STE, whose equivalent forward is the identity on
  ``|w| <= 1``), averaged over layers. ReSTE's own code evaluates it at ``o_end`` instead; that
  value is logged too (``estimating_error_o_end``).
* Gradient stability (lower is steadier): per binary layer ``var(|dL/dW|)`` of the latent
  weights' gradient after each step, averaged over layers and over the steps of the epoch
  (ReSTE's code keeps only the epoch's last step, which is noisier).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.plots import Panel, write_panels
from qtool.quant.binarize import BinaryOptions
from qtool.quant.binary import BinaryConv2d, binary_layers
from qtool.quant.sign_estimator import binary_sign, power_function
from qtool.train.methods import Method, register


def o_schedule(epoch: int, epochs: int, o_end: float) -> float:
    """ReSTE's cosine ramp of ``o`` over the epochs 0 .. epochs - 1 (``main.py`` of the official
    code), ending *at* ``o_end`` in the last epoch: the official ramp divides by ``epochs`` and
    stops short (2.69 of 3 after 10 epochs), which short runs cannot afford."""
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2 * min(1.0, epoch / max(1, epochs - 1))))


@torch.no_grad()
def estimating_error(latent: torch.Tensor, o: float) -> float:
    """``|| sign(z) - f_o(z) ||_2``: the distance between the forward and the estimator it implies."""
    return float(torch.linalg.vector_norm(power_function(latent, o) - binary_sign(latent)))


@torch.no_grad()
def gradient_stability(grad: torch.Tensor) -> float:
    """``var(|g|)`` (unbiased, as ``torch.var``): how unevenly one step moves the weights."""
    return float(grad.abs().flatten().var())


class EstimatorSchedule:
    """Trainer callback: sets ``o`` on every binary layer each epoch and logs the indicators."""

    def __init__(self, layers: list[BinaryConv2d], estimator: str, o_end: float):
        if not layers:
            raise QtoolError("the model has no binary layers; prepare it with qtool.quant.binarize.prepare_binary")
        self.layers = layers
        self.estimator = estimator
        self.o_end = o_end
        self.history: dict[str, list[float]] = {
            "o": [], "estimating_error": [], "gradient_stability": [], "estimating_error_o_end": []}
        self._stability_sum, self._stability_steps = 0.0, 0

    @property
    def o(self) -> float:
        return self.layers[0].estimator.o

    def _set_o(self, o: float) -> None:
        for layer in self.layers:
            layer.estimator.o = o

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._set_o(o_schedule(epoch, trainer.epochs, self.o_end) if self.estimator == "reste" else 1.0)
        self._stability_sum, self._stability_steps = 0.0, 0

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        grads = [layer.weight.grad for layer in self.layers if layer.weight.grad is not None]
        if grads:
            self._stability_sum += sum(gradient_stability(g) for g in grads) / len(grads)
            self._stability_steps += 1
        if step % trainer.steps_per_epoch == 0 or step == trainer.total_steps:
            self._end_epoch()

    def _end_epoch(self) -> None:
        weights = [layer.weight for layer in self.layers]
        self.history["o"].append(self.o)
        self.history["estimating_error"].append(sum(estimating_error(w, self.o) for w in weights) / len(weights))
        self.history["estimating_error_o_end"].append(
            sum(estimating_error(w, self.o_end) for w in weights) / len(weights))
        self.history["gradient_stability"].append(self._stability_sum / max(1, self._stability_steps))

    def report(self) -> dict:
        return {"estimator": {**self.history, "name": self.estimator, "o_end": self.o_end,
                              "t": self.layers[0].estimator.t, "m": self.layers[0].estimator.m}}

    def write_artifacts(self, out_dir) -> None:
        """``estimator.png``: both indicators and o per epoch, next to report.json."""
        epochs = list(range(1, len(self.history["o"]) + 1))

        def curve(key: str) -> tuple[list[int], list[float]]:
            return epochs, self.history[key]

        error = Panel("estimating error (mean over binary layers)", "||sign(w) - f(w)||",
                      {"at the epoch's o": curve("estimating_error"),
                       f"at o_end = {self.o_end:g}": curve("estimating_error_o_end")}, xlabel="epoch")
        schedule = Panel("o (1 = STE)", "o", {"o": curve("o")}, xlabel="epoch")
        stability = Panel("gradient stability var(|g|) (lower: steadier)", "var(|g|)",
                          {"var(|g|)": curve("gradient_stability")}, xlabel="epoch", yscale="log")
        write_panels(Path(out_dir) / "estimator.png", [error, schedule, stability],
                     title=f"{self.estimator.upper()} estimator")

    def state_dict(self) -> dict:
        return {"o": self.o, "history": {k: list(v) for k, v in self.history.items()},
                "stability": (self._stability_sum, self._stability_steps)}

    def load_state_dict(self, state: dict) -> None:
        self._set_o(state["o"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._stability_sum, self._stability_steps = state["stability"]


def setup(model, trainer, options: dict) -> list:
    """``Method.setup``: the schedule/indicator callback over the model's binary layers."""
    chosen = BinaryOptions.from_options(options)
    return [EstimatorSchedule([layer for _, layer in binary_layers(model)], chosen.estimator, chosen.o_end)]


register(Method("ste", "plain", "binary network, straight-through estimator (|z| <= 1)", binary=True,
                setup=setup, options={"estimator": "ste"}, check_options=BinaryOptions.from_options))
register(Method("reste", "plain", "binary network, ReSTE estimator with the cosine o schedule", binary=True,
                setup=setup, options={"estimator": "reste"}, check_options=BinaryOptions.from_options))
