"""The run folder (``--out``) and ``--resume``.

::

    OUT/model.pt, OUT/report.json     the result (written once, at the end)
    OUT/checkpoints/pretrain.pt       full-precision pre-training state (when it ran here)
    OUT/checkpoints/qat.pt            QAT state

``qtool quantize --resume OUT`` continues the interrupted run with the options stored in its
newest checkpoint. Options given again must agree with them, except those that say where
files go or how the run is executed, which cannot change the numbers.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from qtool.errors import QtoolError
from qtool.options import QuantizeOptions
from qtool.train.resume import read_training_checkpoint

PHASES = ("pretrain", "qat")
# May differ between an interrupted run and its resumption: where files go and how the run executes.
# (--threads changes the float summation order: given again, the run continues close to, not
# bit-identical with, the uninterrupted one.)
MAY_CHANGE_ON_RESUME = frozenset({"out", "resume", "device", "threads", "cache_dir", "use_cache", "checkpoints",
                                  "checkpoint_every"})


def checkpoint_path(out: str | Path, phase: str) -> Path:
    return Path(out) / "checkpoints" / f"{phase}.pt"


def resumable_checkpoint(folder: str | Path, phase: str) -> dict | None:
    """The training state of ``phase`` saved in run folder ``folder`` (None when there is none)."""
    path = checkpoint_path(folder, phase)
    if not path.exists():
        return None
    payload = read_training_checkpoint(path)
    if payload["meta"].get("phase") != phase:
        raise QtoolError(f"{path} does not hold the {phase} state of a qtool run")
    return payload


def training_state(payload: dict) -> dict:
    """A checkpoint payload as a ``Trainer.state_dict()`` (the weights are stored once, as the
    checkpoint's own ``state_dict``)."""
    return {"model": payload["state_dict"], **payload["training"]}


def resumed_options(options: QuantizeOptions, explicit: set[str] | None = None) -> QuantizeOptions:
    """The options of the run in ``options.resume``, after checking the ones given again.

    ``explicit`` names the options the user gave; by default, every option that differs from
    its default value."""
    folder = Path(options.resume)
    if not folder.is_dir():
        raise QtoolError(f"--resume {folder}: not a run folder (pass the --out folder of the interrupted run)")
    payload = None
    for phase in reversed(PHASES):  # the newest phase holds the newest state
        payload = resumable_checkpoint(folder, phase)
        if payload is not None:
            break
    if payload is None:
        raise QtoolError(f"--resume {folder}: no checkpoint to resume from (expected {checkpoint_path(folder, 'qat')} "
                         f"or {checkpoint_path(folder, 'pretrain')})")
    names = {f.name for f in fields(QuantizeOptions)}
    saved = {k: v for k, v in payload["meta"]["options"].items() if k in names}
    if explicit is None:
        defaults = QuantizeOptions(model=saved["model"], out=saved["out"])
        explicit = {name for name in names if getattr(options, name) != getattr(defaults, name)}
    for name in sorted(explicit - MAY_CHANGE_ON_RESUME):
        if name in saved and getattr(options, name) != saved[name]:
            flag = "MODEL" if name == "model" else "--" + name.replace("_", "-")
            raise QtoolError(f"{flag} {getattr(options, name)!r} differs from the interrupted run's {saved[name]!r}; "
                             "a resumed run continues the same training (start a new run to change it)")
    kept = {name: getattr(options, name) for name in MAY_CHANGE_ON_RESUME & explicit}
    kept.setdefault("out", str(folder))
    return QuantizeOptions(**{**saved, **kept, "resume": str(folder)})
