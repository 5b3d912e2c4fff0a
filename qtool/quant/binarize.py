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
from qtool.options import check_method_options
from qtool.quant.binary import ESTIMATORS, BinaryEstimator
from qtool.quant.binary_layouts import BINARY_ZOO, binary_layout
from qtool.quant.prepare import Plan, apply_plan, quantizable_layers


@dataclass(frozen=True)
class BinaryOptions:
    """What ``-O KEY=VALUE`` can set for ``--bits 1`` (``ste``/``reste``), checked by ``from_options``.

    ``o_end``, ``t``, ``m``: ReSTE's schedule end, clip and secant width, which the STE does not
    take; ``scale``: ``layer`` (ReSTE) or ``channel``; ``keep_bits``: 32 keeps the first conv, the
    classifier and the 1x1 projections in float, 2-8 quantizes them with LSQ.
    """

    estimator: str = "reste"
    o_end: float = 3.0
    t: float = 1.5
    m: float = 0.1
    scale: str = "layer"
    keep_bits: int = 32

    @classmethod
    def from_options(cls, options: dict) -> "BinaryOptions":
        """Check a user's binary options, fill in defaults; a mistake is one ``QtoolError`` line
        (the same check as every method's, ``qtool.options.check_method_options``)."""
        estimator = options.get("estimator", cls.estimator)
        values = check_method_options(cls, options, estimator if estimator in ESTIMATORS else "binary", CHOICES)
        reste = sorted({"o_end", "t", "m"} & set(values))
        if values.get("estimator") == "ste" and reste:
            raise QtoolError(f"{', '.join(reste)} tune ReSTE; --method ste clips at |z| <= 1 and takes none of them")
        chosen = cls(**values)
        if chosen.o_end < 1:
            raise QtoolError(f"reste option o_end must be at least 1, got {chosen.o_end}")
        BinaryEstimator(chosen.estimator, t=chosen.t, m=chosen.m)  # checks t and m
        return chosen


CHOICES = {"estimator": ESTIMATORS, "scale": ("layer", "channel"), "keep_bits": (32, 8, 4, 3, 2)}


def check_binary_request(model: str, method_options: dict, user_options: dict) -> None:
    """Fail fast (before data loading and pre-training) on a zoo model or an option that
    ``--bits 1`` cannot take. ``model`` is a zoo name or a checkpoint path (checked later);
    ``method_options`` are the method's own (its estimator), ``user_options`` the ``-O`` ones."""
    if model in ZOO and model not in BINARY_ZOO:
        raise QtoolError(f"--bits 1 supports {', '.join(BINARY_ZOO)}, not {model}")
    chosen = method_options.get("estimator")
    if "estimator" in user_options and user_options["estimator"] != chosen:
        raise QtoolError(f"the method sets the estimator ({chosen}); choose another with --method, not -O estimator")
    BinaryOptions.from_options({**method_options, **user_options})


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
    ``BinaryOptions``'. The plan is stored as ``model.qtool_plan`` for checkpoints."""
    plan = binary_plan(model, BinaryOptions.from_options(options))
    if not inplace:
        model = copy.deepcopy(model)
    apply_plan(model, plan)
    model.qtool_plan = plan  # read by the checkpoint writer
    return model
