"""Training methods by name, DomainBed-style: comparing methods means swapping one name.

A method says which optimizer family steps the weights and which callbacks run in the loop.
Methods that need more (GAQAT's scale-gradient hook, ReSTE's estimator schedule) register a
``setup`` that receives the prepared model and the trainer and returns callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# setup(model, trainer, options) -> list of callbacks; runs after the trainer (and so the
# optimizer) exists, so it can attach hooks to the optimizer.
Setup = Callable[..., list]
# check_options(options) raises QtoolError for a bad -O KEY=VALUE before any training starts.
CheckOptions = Callable[[dict], None]


@dataclass
class Method:
    name: str
    optimizer: str  # plain | sam | gsam | sagm
    summary: str
    binary: bool = False  # only valid with --bits 1
    setup: Setup | None = None
    options: dict = field(default_factory=dict)
    check_options: CheckOptions | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
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
