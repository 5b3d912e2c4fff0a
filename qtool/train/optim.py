"""Flatness-seeking optimizers (SAM, GSAM, SAGM) as wrappers around any torch optimizer.

All three share one two-pass skeleton:

1. ``g``   = gradient of the loss at the weights ``w``;
2. ``e``   = a perturbation computed from ``g`` (method-specific);
3. ``g_p`` = gradient of the loss at ``w + e`` (the "smoothness" or perturbed loss);
4. ``d``   = the update direction, combined from ``g`` and ``g_p`` (method-specific);
5. hooks (GAQAT) may edit ``d`` for some parameters, then the base optimizer steps with ``d``.

``PlainStep`` has the same interface with a single pass (``e = 0``, hooks included), so a
training loop calls ``optimizer.step(loss_fn)`` whatever the method.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from qtool.errors import InputError
from qtool.options import default

RHO = default("rho")  # the command line's --rho

# loss_fn(perturbed) runs the forward pass and returns (loss, logits); the optimizer owns backward.
LossFn = Callable[[bool], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TwoPassGrads:
    """What one step saw, handed to hooks, which edit ``direction`` in place. A ``PlainStep``
    hands its one gradient as both ``grad`` and ``perturbed_grad``."""

    params: list[torch.nn.Parameter]
    grad: list[torch.Tensor]  # g: clean loss
    perturbed_grad: list[torch.Tensor]  # g_p: loss at w + e
    direction: list[torch.Tensor]  # d: what the base optimizer will use
    loss: float
    perturbed_loss: float


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class PlainStep:
    """One forward/backward, then the base optimizer (plain QAT: the ``lsq`` method)."""

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base
        self.hooks: list[Callable[[TwoPassGrads], None]] = []

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.base.param_groups for p in group["params"] if p.requires_grad]

    def step(self, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        self.base.zero_grad(set_to_none=True)
        loss, logits = loss_fn(False)
        loss.backward()
        if not self.hooks:
            self.base.step()
            return loss.detach(), logits.detach()
        # One pass: the "perturbed" point is w itself (e = 0). Parameters without a gradient
        # stay out, so that the base optimizer skips them as it would without hooks.
        params = [p for p in self.params if p.grad is not None]
        grad = self._gradients(params)
        value = float(loss.detach())
        self._step_along(TwoPassGrads(params, grad, grad, [g.clone() for g in grad], value, value))
        return loss.detach(), logits.detach()

    def _gradients(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def _step_along(self, grads: TwoPassGrads) -> None:
        """Hooks edit ``grads.direction``; then the base optimizer steps along it."""
        for hook in self.hooks:
            hook(grads)
        for p, d in zip(grads.params, grads.direction):
            p.grad = d
        self.base.step()

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


class TwoPassOptimizer(PlainStep):
    """The shared SAM-family skeleton; subclasses define ``perturbation`` and ``combine``."""

    def __init__(self, base: torch.optim.Optimizer, rho: float = RHO):
        super().__init__(base)
        if rho < 0:
            raise InputError(f"--rho must be non-negative, got {rho}")
        self.rho = rho

    def perturbation(self, grad: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def combine(self, grad: list[torch.Tensor], perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def step(self, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.params
        self.base.zero_grad(set_to_none=True)
        loss, logits = loss_fn(False)
        loss.backward()
        grad = self._gradients(params)

        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.perturbation(grad)):
                p.add_(e)
        self.base.zero_grad(set_to_none=True)
        perturbed_loss, _ = loss_fn(True)
        perturbed_loss.backward()
        perturbed = self._gradients(params)
        with torch.no_grad():  # restore exactly (w + e - e is not w in floating point)
            for p, w in zip(params, saved):
                p.copy_(w)

        self._step_along(TwoPassGrads(params, grad, perturbed, self.combine(grad, perturbed),
                                      float(loss.detach()), float(perturbed_loss.detach())))
        return loss.detach(), logits.detach()


class SAM(TwoPassOptimizer):
    """Foret et al. 2021: e = rho g/||g||; step along g_p."""

    def perturbation(self, grad):
        scale = self.rho / (_global_norm(grad) + 1e-12)
        return [g * scale for g in grad]

    def combine(self, grad, perturbed):
        return perturbed


class GSAM(SAM):
    """Zhuang et al. 2022: same ascent as SAM; step along g_p - alpha * (component of g orthogonal to g_p),
    which also shrinks the surrogate gap h = L(w + e) - L(w)."""

    def __init__(self, base, rho: float = RHO, alpha: float = 0.1):
        super().__init__(base, rho)
        self.alpha = alpha

    def combine(self, grad, perturbed):
        dot = sum((g * gp).sum() for g, gp in zip(grad, perturbed))
        projection = dot / (_global_norm(perturbed) ** 2 + 1e-12)
        return [gp - self.alpha * (g - projection * gp) for g, gp in zip(grad, perturbed)]


class SAGM(TwoPassOptimizer):
    """Wang et al. 2023: e = (rho/||g|| - alpha) g; step along (g + g_p)/2, which matches the
    gradients of the clean and the perturbed loss."""

    def __init__(self, base, rho: float = RHO, alpha: float = 1e-3):
        super().__init__(base, rho)
        self.alpha = alpha

    def perturbation(self, grad):
        scale = self.rho / (_global_norm(grad) + 1e-12) - self.alpha
        return [g * scale for g in grad]

    def combine(self, grad, perturbed):
        return [0.5 * (g + gp) for g, gp in zip(grad, perturbed)]


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer family: its class and the hyper-parameters it takes, with their defaults."""

    build: type[PlainStep]
    defaults: dict


def _entry(cls: type[PlainStep]) -> OptimizerEntry:
    """The defaults are those of the class's signature (after the base optimizer): written once."""
    parameters = list(inspect.signature(cls).parameters.values())[1:]
    return OptimizerEntry(cls, {p.name: p.default for p in parameters})


# Every optimizer name qtool takes (``--pretrain-method``, a method's ``optimizer``,
# ``TrainConfig.optimizer``) is checked and built here.
OPTIMIZERS: dict[str, OptimizerEntry] = {
    "plain": _entry(PlainStep), "sam": _entry(SAM), "gsam": _entry(GSAM), "sagm": _entry(SAGM)}


def check_optimizer(name: str, what: str = "optimizer") -> OptimizerEntry:
    """The registry entry of ``name``; an unknown name is one error line (``what`` names the flag)."""
    if name not in OPTIMIZERS:
        raise InputError(f"unknown {what} {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def build_optimizer(name: str, base: torch.optim.Optimizer, **hyper) -> PlainStep:
    """The ``OPTIMIZERS`` entry ``name`` around ``base``; ``hyper`` (``rho``, ``alpha``) that are
    None or that the family does not take are left to its defaults."""
    entry = check_optimizer(name)
    return entry.build(base, **{k: v for k, v in hyper.items() if v is not None and k in entry.defaults})
