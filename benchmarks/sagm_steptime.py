"""What makes a W4A4 SAGM training step cheaper on a CPU: channels-last memory (qtool's
default), torch.compile (inductor) of the graph-prepared model, and how much of the step is
the optimizer's Python-side work (SAGM's per-parameter copies) rather than the two
forward/backward passes.

    python benchmarks/sagm_steptime.py --threads 1 --batch 128 --repeats 5 --json docs/results/sagm-steptime.json

Every variant is its own copy of one calibrated W4A4 resnet20 (graph placement) with its own
Adam+SAGM, stepped on the same batch; variants run interleaved (``qtool.timing``), medians of
``--repeats`` rounds of ``--steps`` steps. ``plain`` (one forward/backward and Adam) tells the
passes' cost: SAGM - 2 x plain is what the optimizer's own work adds. The compiled variant is
timed after its compilation (reported separately).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def calibrated_model(batch: int) -> torch.nn.Module:
    import qtool
    from qtool.models import resnet20

    torch.manual_seed(0)
    model = qtool.prepare(resnet20(), bits=4, act_bits=4)
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))
    return model.train()


def stepper(model: torch.nn.Module, optimizer_name: str, images, labels, forward=None):
    from qtool.train.optim import build_optimizer

    optimizer = build_optimizer(optimizer_name, torch.optim.Adam(model.parameters(), lr=1e-5))
    forward = model if forward is None else forward

    def loss_fn(perturbed):
        logits = forward(images)
        return F.cross_entropy(logits, labels), logits

    return lambda: optimizer.step(loss_fn)


def main(argv=None) -> None:
    from qtool.timing import interleaved_ms, medians

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = calibrated_model(args.batch)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))
    last = images.contiguous(memory_format=torch.channels_last)
    variants = {}
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    variants["sagm, channels-last (default)"] = stepper(cl, "sagm", last, labels)
    variants["plain, channels-last"] = stepper(copy.deepcopy(cl), "plain", last, labels)
    variants["sagm, contiguous"] = stepper(copy.deepcopy(base), "sagm", images, labels)
    compile_s, compile_error = None, None
    if not args.no_compile:
        compiled_model = copy.deepcopy(cl)
        compiled = torch.compile(compiled_model, dynamic=False)  # LSQ gradient scales are Python numbers of the shapes
        step = stepper(compiled_model, "sagm", last, labels, forward=compiled)
        start = time.perf_counter()
        try:
            step(), step()  # compiles forward and backward
            compile_s = time.perf_counter() - start
            variants["sagm, torch.compile (inductor)"] = step
        except Exception as error:  # noqa: BLE001 - a compiler failure is a result here, reported
            compile_error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            print(f"torch.compile failed after {time.perf_counter() - start:.0f} s: {compile_error}", flush=True)

    def rounds(fn):
        def run():
            for _ in range(args.steps):
                fn()
        return run

    times = medians(interleaved_ms({k: rounds(v) for k, v in variants.items()}, args.repeats, warmup=1))
    per_step = {k: v / args.steps for k, v in times.items()}
    default = per_step["sagm, channels-last (default)"]
    result = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "steps": args.steps,
              "ms_per_step": per_step, "ratio_to_default": {k: v / default for k, v in per_step.items()},
              "optimizer_overhead_ms": default - 2 * per_step["plain, channels-last"], "compile_s": compile_s,
              "compile_error": compile_error,
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
