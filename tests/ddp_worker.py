"""One data-parallel training run through the Python API, for tests/test_distributed.py.

``python ddp_worker.py DATA OUT`` runs one process; under ``torchrun --nproc_per_node N`` it
runs data-parallel. Every rank writes
``OUT/rank<R>.pt`` (a test harness may: the product writes from rank 0 only) holding the final
weights, the model-selection history, what the two-pass optimizer's hooks saw at each step
(the statistics GAQAT decides from) and, when GAQAT is installed, its freeze decisions.

In float64 the data-parallel computation equals the single-process one to rounding error; in
float32 Adam's normalised first steps turn the sign of near-zero gradient sums (noise at the
1e-7 level, which differs with the summation order) into +-lr updates, so exact comparisons
of weights are only meaningful in float64.
"""

from __future__ import annotations

import sys

import torch

from qtool.data import load_domains, split_domains
from qtool.models import build_model
from qtool.quant.prepare import prepare
from qtool.train.distributed import joined_world
from qtool.train.methods import get_method, method_names
from qtool.train.trainer import TrainConfig, Trainer

CONFIG = TrainConfig(steps=4, batch_size=8, lr=1e-3, optimizer="sagm", augment=True, evals=2, seed=3)


class ScaleGradientProbe:
    """Records, per step, what a GAQAT-style hook reads from ``TwoPassGrads``: the sign
    agreement of the task and smoothness gradients of every quantizer scale, and the
    perturbation-defining gradient norm."""

    def __init__(self, model: torch.nn.Module):
        self.scales = {id(p) for n, p in model.named_parameters() if n.endswith("scale")}
        self.steps: list[dict] = []

    def __call__(self, grads) -> None:
        pairs = [(g, gp) for p, g, gp in zip(grads.params, grads.grad, grads.perturbed_grad) if id(p) in self.scales]
        self.steps.append({
            "agreement": torch.stack([(torch.sign(g) == torch.sign(gp)).double().mean() for g, gp in pairs]),
            "grad_norm": torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.grad])),
        })


def train(data_path: str, out: str) -> None:
    data = load_domains(data_path)
    split = split_domains(data, "d0", holdout=0.2, seed=0)
    with joined_world("cpu") as world:
        torch.manual_seed(0)
        model = prepare(build_model("resnet20", data.num_classes, data.channels), 4, 4, 8, inplace=True).double()
        trainer = Trainer(model, split, CONFIG, world=world)
        probe = ScaleGradientProbe(model)
        trainer.optimizer.hooks.append(probe)
        if "gaqat" in method_names():  # GAQAT itself, deciding every 2 steps from a 2-step window
            gaqat = get_method("gaqat")
            trainer.callbacks = gaqat.setup(model, trainer, {**gaqat.options, "window": 2, "every": 2, "tau": 0.5})
        result = trainer.fit()
        torch.save({"state": model.state_dict(), "history": result.history, "probe": probe.steps,
                    "reports": trainer.callback_reports()}, f"{out}/rank{world.rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], sys.argv[2])
