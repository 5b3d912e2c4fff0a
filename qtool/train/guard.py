"""The divergence guard: stop at the first NaN/Inf instead of training garbage for hours.

Checked after every step on values every rank shares (the all-reduced loss, the replicated
parameters, which include every quantizer's step size), so all ranks stop at the same step.
A checkpoint is written only after a step passed this check, so the last one on disk is good.
"""

from __future__ import annotations

import math

from torch import nn


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter (the CLI exits with code 3)."""


def first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter holding a NaN or an Inf, if any (LSQ step sizes included)."""
    for name, parameter in model.named_parameters():
        if not bool(parameter.detach().isfinite().all()):
            return name
    return None


def check_step(step: int, loss: float, model: nn.Module, last_good: str) -> None:
    """Raise ``DivergenceError`` when step ``step`` left a non-finite loss or parameter.

    ``last_good`` says where the last good checkpoint is (or that there is none)."""
    if not math.isfinite(loss):
        problem = f"the loss is {loss}"
    else:
        name = first_non_finite(model)
        if name is None:
            return
        kind = "quantizer step size" if name.endswith("scale") else "parameter"
        problem = f"{kind} {name} is not finite"
    raise DivergenceError(f"training diverged at step {step}: {problem}; {last_good}. "
                          f"Lower --lr (or --rho) and start again")
