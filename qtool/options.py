"""The options of ``qtool quantize``, in a torch-free module: the CLI and ``TrainConfig`` read
their defaults here, so a default is written once, and ``qtool bench`` on an edge device never
imports torch. ``check_method_options`` is the one check of every method's ``-O KEY=VALUE``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from qtool.errors import QtoolError

VALID_BITS = (1, 2, 3, 4, 8, 32)  # 32 = full precision, for "FP trained for the same steps" baselines


@dataclass
class QuantizeOptions:
    model: str
    out: str
    data: str = "rotated-digits"
    target_domain: str | None = None
    bits: int = 4
    act_bits: int | None = None
    method: str = "sagm"
    epochs: float = 6.0
    pretrain_epochs: float = 15.0
    pretrain_method: str = "plain"  # SAGM learns no faster per step at 1.65x the time (docs/results/pretrain-defaults.md)
    seed: int = 0
    batch_size: int = 128
    lr: float = 2e-4
    pretrain_lr: float = 1e-3
    weight_decay: float = 0.0
    rho: float = 0.05
    alpha: float | None = None
    first_last_bits: int | None = 8
    image_size: int | None = None
    holdout: float = 0.2
    evals: int = 8
    steps: int | None = None
    augment: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    method_options: dict = field(default_factory=dict)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    threads: int | None = None  # torch threads per process (None: torch's choice, recorded when training starts)
    checkpoints: bool = True  # resumable checkpoints in OUT/checkpoints at each epoch end
    checkpoint_every: int = 0  # ... and every N steps
    resume: str | None = None  # run folder of an interrupted run to continue


def default(name: str):
    """The default of one option (for the CLI's ``--help``)."""
    for item in fields(QuantizeOptions):
        if item.name == name:
            return item.default
    raise KeyError(name)


def check_method_options(cls, values: dict, label: str, choices: dict[str, tuple] | None = None) -> dict:
    """Check ``-O KEY=VALUE`` options against ``cls``, a method's options dataclass, the same way
    for every method: an unknown key, or a value of the wrong kind or not in ``choices[key]``, is
    one ``QtoolError`` line naming the key and what it allows. Returns the values converted to
    the type of each field's default; range checks across fields are the method's own."""
    known = {item.name: item.default for item in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise QtoolError(f"unknown {label} option {', '.join(unknown)}; valid options: {', '.join(known)}")
    choices = choices or {}
    checked = {}
    for key, value in values.items():
        default = known[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise QtoolError(f"{label} option {key} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QtoolError(f"{label} option {key} must be a number, got {value!r}")
            if isinstance(default, int) and value != int(value):
                raise QtoolError(f"{label} option {key} must be a whole number, got {value!r}")
            value = type(default)(value)
        if key in choices and value not in choices[key]:
            allowed = ", ".join(str(choice) for choice in choices[key])
            raise QtoolError(f"{label} option {key} must be one of {allowed}, got {value!r}")
        checked[key] = value
    return checked
