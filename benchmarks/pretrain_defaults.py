"""What slows early full-precision pre-training: SAGM vs plain Adam, augmentation, LR schedule.

    # resnet20 on digits_dg (sources mnist + mnist_m), 100 steps of batch 128 per variant, 1 thread
    nice -n 5 python benchmarks/pretrain_defaults.py --model resnet20 --json docs/results/pretrain-defaults.json

Each variant trains qtool's own ``Trainer`` from the same seeded initialisation and batches and
reports the mean source-validation accuracy (and per domain) at a few early steps. The LR schedule
is that of a run of ``--horizon-epochs`` epochs (the pre-training budget), stopped after
``--steps``: the early part of a long run, not a short run whose cosine decays to zero (the
``short-cosine`` variant measures that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "digits_dg.npz"

# name -> (TrainConfig overrides, schedule horizon: "budget" or "steps")
VARIANTS = {
    "sagm-aug": ({"optimizer": "sagm", "augment": True}, "budget"),  # qtool's default until now
    "plain-aug": ({"optimizer": "plain", "augment": True}, "budget"),
    "sagm-noaug": ({"optimizer": "sagm", "augment": False}, "budget"),
    "plain-noaug": ({"optimizer": "plain", "augment": False}, "budget"),
    "sagm-aug-short-cosine": ({"optimizer": "sagm", "augment": True}, "steps"),  # cosine to 0 at --steps
    "plain-aug-lr3e-3": ({"optimizer": "plain", "augment": True, "lr": 3e-3}, "budget"),
}


class Stop(Exception):
    pass


class Probe:
    """Trainer callback: source-validation accuracy at chosen steps, then stop the run."""

    def __init__(self, at: list[int]):
        self.at, self.curve = sorted(at), []

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        from qtool.evaluate import source_validation_accuracy

        if step in self.at:
            per_domain = source_validation_accuracy(trainer.model, trainer.split)
            self.curve.append({"step": step, "loss": round(loss, 4),
                               "val": round(100 * sum(per_domain.values()) / len(per_domain), 2),
                               "per_domain": {k: round(100 * v, 2) for k, v in per_domain.items()}})
        if step >= self.at[-1]:
            raise Stop


def run_variant(args, split, overrides: dict, horizon: str) -> dict:
    import torch

    from qtool.models import build_model
    from qtool.options import default
    from qtool.train.trainer import TrainConfig, Trainer

    torch.manual_seed(args.seed)
    model = build_model(args.model, 10, 3)
    config = TrainConfig(batch_size=args.batch_size, seed=args.seed, evals=1, epochs=args.horizon_epochs,
                         lr=default("pretrain_lr"))  # TrainConfig's defaults are QAT's
    config = replace(config, **overrides, steps=args.steps if horizon == "steps" else None)
    probe = Probe([round(args.steps * f) for f in (0.25, 0.5, 1.0)])
    trainer = Trainer(model, split, config, callbacks=[probe])
    start = time.perf_counter()
    try:
        trainer.fit()
    except Stop:
        pass
    return {"curve": probe.curve, "seconds": round(time.perf_counter() - start, 1),
            "schedule_steps": trainer.total_steps, "steps_per_epoch": trainer.steps_per_epoch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--target", default="syn", help="held-out domain (the issue's case: sources mnist, mnist_m)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--horizon-epochs", type=float, default=10.0, help="pre-training budget the schedule spans")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="merge the results into this file (keyed by model)")
    args = parser.parse_args(argv)

    import torch

    from qtool.data import load_domains, split_domains

    torch.set_num_threads(args.threads)
    split = split_domains(load_domains(args.data), args.target, 0.2, args.seed)
    results = {}
    for name in args.variants:
        results[name] = run_variant(args, split, *VARIANTS[name])
        print(name, json.dumps(results[name]["curve"][-1]), f"{results[name]['seconds']} s", flush=True)
    if args.json:
        path = Path(args.json)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.setdefault("runs", {})[args.model] = {
            "command": "python benchmarks/pretrain_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "variants")}, "variants": results}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
