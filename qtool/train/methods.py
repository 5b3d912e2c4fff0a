"""Training methods by name, DomainBed-style: comparing methods means swapping one name.

A method says which optimizer family steps the weights and which callbacks run in the loop.
Methods that need more (GAQAT's scale-gradient hook, ReSTE's estimator schedule) register a
``setup`` that receives the prepared model and the trainer and returns callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qtool.train.optim import check_optimizer

# setup(model, trainer, options) -> list of callbacks; runs after the trainer (and so the
# optimizer) exists, so it can attach hooks to the optimizer.
Setup = Callable[..., list]
# check_options(options) returns the method's options dataclass, or raises one QtoolError line for
# a bad -O KEY=VALUE (``qtool.options.check_method_options``) before any training starts. A method
# without it takes no -O options.
CheckOptions = Callable[[dict], object]


@dataclass
class Method:
    name: str
    optimizer: str  # a name in qtool.train.optim.OPTIMIZERS
    summary: str
    binary: bool = False  # only valid with --bits 1
    setup: Setup | None = None
    options: dict = field(default_factory=dict)
    check_options: CheckOptions | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    check_optimizer(method.optimizer)
    METHODS[method.name] = method
    return method


register(Method("lsq", "plain", "plain LSQ QAT with Adam"))
register(Method("sam", "sam", "LSQ QAT with SAM (direct DG-QAT)"))
register(Method("gsam", "gsam", "LSQ QAT with GSAM (direct DG-QAT)"))
register(Method("sagm", "sagm", "LSQ QAT with SAGM (direct DG-QAT)"))


def get_method(name: str) -> Method:
    _load_plugins()
    return METHODS[name]


def method_names() -> list[str]:
    _load_plugins()
    return list(METHODS)


def _load_plugins() -> None:
    """Methods that live in their own modules register themselves on import."""
    import importlib

    for module in ("qtool.train.gaqat", "qtool.train.binary"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
