"""``prepare_binary``: plan a binary network (``qtool quantize --bits 1``) and check its options.

Every conv but the first and the 1x1 projections becomes a ``BinaryConv2d``; those and the
classifier stay in float or LSQ (``keep_bits``); the model's class adds its block rewiring
(``qtool.quant.binary_layouts``). The plan is a ``qtool.quant.prepare.Plan``, stored in
checkpoints and applied by ``apply_plan`` like an LSQ plan.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from qtool.errors import QtoolError
from qtool.models import ZOO
from qtool.quant.binary import BinaryEstimator
from qtool.quant.binary_layouts import BINARY_ZOO, binary_layout
from qtool.quant.prepare import Plan, apply_plan, quantizable_layers


@dataclass(frozen=True)
class BinaryOptions:
    """What ``-O KEY=VALUE`` can set for ``--bits 1`` (see ``binary_options``)."""

    estimator: str = "reste"
    o_end: float = 3.0
    t: float = 1.5
    m: float = 0.1
    scale: str = "layer"
    keep_bits: int = 32


def binary_options(estimator: str = "reste", o_end: float | None = None, t: float | None = None,
                   m: float | None = None, scale: str = "layer", keep_bits: int = 32, **unknown) -> BinaryOptions:
    """Check a user's binary options, fill in defaults; a mistake is one ``QtoolError`` line.

    ``o_end``, ``t``, ``m``: ReSTE's schedule end (3), clip (1.5) and secant width (0.1), which
    the STE does not take; ``scale``: ``layer`` (ReSTE) or ``channel``; ``keep_bits``: 32 keeps
    the first conv, the classifier and the 1x1 projections in float, 2-8 quantizes them with LSQ.
    """
    if unknown:
        raise QtoolError(f"unknown binary option(s) {', '.join(sorted(unknown))}; "
                         "known: o_end, t, m (ReSTE), scale (layer|channel), keep_bits (32|8|4|3|2)")
    reste = {"o_end": o_end, "t": t, "m": m}
    if estimator == "ste" and any(value is not None for value in reste.values()):
        raise QtoolError("o_end, t and m tune ReSTE; --method ste clips at |z| <= 1 and takes none of them")
    defaults = BinaryOptions()
    reste = {key: float(getattr(defaults, key) if value is None else value) for key, value in reste.items()}
    if reste["o_end"] < 1:
        raise QtoolError(f"ReSTE's o_end must be at least 1, got {reste['o_end']}")
    BinaryEstimator(estimator, t=reste["t"], m=reste["m"])  # checks the estimator, t and m
    if scale not in ("layer", "channel"):
        raise QtoolError(f"binary scale must be 'layer' or 'channel', got {scale!r}")
    if keep_bits not in (2, 3, 4, 8, 32):
        raise QtoolError(f"keep_bits must be 32 (float) or 2, 3, 4, 8 (LSQ), got {keep_bits}")
    return BinaryOptions(estimator, scale=scale, keep_bits=keep_bits, **reste)


def check_binary_request(model: str, method_options: dict, user_options: dict) -> None:
    """Fail fast (before data loading and pre-training) on a zoo model or an option that
    ``--bits 1`` cannot take. ``model`` is a zoo name or a checkpoint path (checked later);
    ``method_options`` are the method's own (its estimator), ``user_options`` the ``-O`` ones."""
    if model in ZOO and model not in BINARY_ZOO:
        raise QtoolError(f"--bits 1 supports {', '.join(BINARY_ZOO)}, not {model}")
    chosen = method_options.get("estimator")
    if "estimator" in user_options and user_options["estimator"] != chosen:
        raise QtoolError(f"the method sets the estimator ({chosen}); choose another with --method, not -O estimator")
    binary_options(**{**method_options, **user_options})


def binary_plan(model: nn.Module, options: BinaryOptions) -> Plan:
    """Binarize every conv except the first and the 1x1 projections; keep those and the
    classifier in float or LSQ (``keep_bits``); add the rewiring of the model's class."""
    plan = binary_layout(model)
    convs = [(name, m) for name, m in quantizable_layers(model) if isinstance(m, nn.Conv2d)]
    kept = {convs[0][0]} | {name for name, m in convs[1:] if m.kernel_size == (1, 1)} if convs else set()
    for name, layer in quantizable_layers(model):
        if isinstance(layer, nn.Conv2d) and name not in kept:
            plan[name] = {"kind": "binary", "bits": 1, "act_bits": 1, "scale": options.scale,
                          "estimator": options.estimator, "t": options.t, "m": options.m}
        elif options.keep_bits != 32:
            plan[name] = {"bits": options.keep_bits, "act_bits": options.keep_bits}
    return plan


def prepare_binary(model: nn.Module, inplace: bool = False, **options) -> nn.Module:
    """Return ``model`` as a binary network (``qtool quantize --bits 1``); ``options`` are
    ``binary_options``'. The plan is stored as ``model.qtool_plan`` for checkpoints."""
    plan = binary_plan(model, binary_options(**options))
    if not inplace:
        model = copy.deepcopy(model)
    apply_plan(model, plan)
    model.qtool_plan = plan  # read by the checkpoint writer
    return model
