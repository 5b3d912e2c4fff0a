"""Binary resnet20 on digits_dg: ReSTE vs STE accuracy at convergence, and binary vs
full-precision step time.

    # accuracy: (a) all three domains as sources (source-validation accuracy), (b) leave mnist_m
    # out (target accuracy); 3 seeds; ReSTE and STE start from the same cached FP model (20 plain
    # Adam epochs, the GAQAT grid's starts: pass its --cache-dir to reuse them) and see the same
    # batches; 10 binary epochs with o rising 1 -> 3 (the last epoch at 3)
    python benchmarks/binary_bench.py accuracy --cache-dir runs/grid-cache --workers 2
    # training step time, ReSTE binary vs FP resnet20, interleaved in one process
    python benchmarks/binary_bench.py steptime --threads 1 --json runs/binary-bench/steptime.json

``accuracy`` runs ``qtool quantize`` commands, pairs (same setting and seed) one setting at a
time, so that a run stopped part-way leaves whole paired comparisons. Resumable into the repository:
each finished run writes a compact report (accuracies, convergence curves, ReSTE's indicators
per epoch) to ``--results/<setting>/<method>-seed<N>.json`` and is skipped next time; a killed
run continues from its checkpoint. Then it prints the mean +- std table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_results import compact, t_interval, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "digits_dg.npz"  # the README's ../shared, from the repository root
RESULTS = REPO / "docs" / "results" / "reste-converged"
METHODS = ("reste", "ste")


def quantize_command(args, setting: str, method: str, seed: int) -> list[str]:
    command = [sys.executable, "-m", "qtool", "quantize", "resnet20", "--data", args.data, "--bits", "1",
               "--method", method, "--epochs", str(float(args.epochs)),
               "--pretrain-epochs", str(float(args.pretrain_epochs)), "--pretrain-method", "plain",
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
               "--evals", str(args.evals), "--threads", "1", "--device", args.device,
               "--cache-dir", args.cache_dir or str(Path(args.out) / "cache"), "--out", str(run_folder(args, setting, method, seed))]
    if setting != "in-distribution":
        command[7:7] = ["--target-domain", setting.removeprefix("target-")]  # after --data DATA
    return command


def run_folder(args, setting: str, method: str, seed: int) -> Path:
    return Path(args.out) / setting / f"{method}-seed{seed}"


def result_path(args, setting: str, method: str, seed: int) -> Path:
    return Path(args.results) / setting / f"{method}-seed{seed}.json"


def run_one(args, setting: str, method: str, seed: int) -> None:
    if result_path(args, setting, method, seed).exists():
        print(f"skip (done): {setting} {method} seed {seed}", flush=True)
        return
    command = quantize_command(args, setting, method, seed)
    out = run_folder(args, setting, method, seed)
    out.mkdir(parents=True, exist_ok=True)
    killed = any((out / "checkpoints" / f"{phase}.pt").exists() for phase in ("pretrain", "qat"))
    print(f"run: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(out / "log.txt", "a") as log:
        result = subprocess.run(command + (["--resume", str(out)] if killed else []), stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        write_result(result_path(args, setting, method, seed), compact(report, " ".join(command[1:]), args.device))
    print(f"  exit {result.returncode} after {time.perf_counter() - start:.0f} s: {out}", flush=True)


def fp_start_ready(args, setting: str, seed: int) -> bool:
    """ReSTE pre-trains and caches the pair's FP start; once it is in its binary phase (or done),
    STE can start from the cache."""
    reste = run_folder(args, setting, "reste", seed)
    return result_path(args, setting, "reste", seed).exists() or (reste / "checkpoints" / "qat.pt").exists()


def run_pairs(args, settings: list[str]) -> None:
    """Every (setting, seed, method), a pair's two runs side by side: with 2 workers a pair
    finishes first, rather than every seed's ReSTE before any STE. STE waits for ReSTE's FP start
    (seconds when it is already cached, as from the GAQAT grid's --cache-dir)."""
    reste_ended = {(setting, seed): threading.Event() for setting in settings for seed in args.seeds}

    def job(setting: str, method: str, seed: int) -> None:
        if method == "reste":
            try:
                run_one(args, setting, method, seed)
            finally:
                reste_ended[setting, seed].set()
            return
        while not (fp_start_ready(args, setting, seed) or reste_ended[setting, seed].is_set()):
            reste_ended[setting, seed].wait(10)
        run_one(args, setting, method, seed)

    jobs = [(setting, method, seed) for setting in settings for seed in args.seeds for method in METHODS]
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda item: job(*item), jobs))


def accuracy(args) -> None:
    # leave-one-out first: it reuses the GAQAT grid's FP starts, so its 3 seeds finish first
    settings = [f"target-{args.target}", "in-distribution"]
    if not args.summarize:
        run_pairs(args, settings)
    summary = summarize(args, settings)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    print(f"curves: {write_curves(args, settings, Path(args.results) / 'curves.png')}")


def write_curves(args, settings: list[str], path: Path) -> Path | None:
    """The tables' evidence in one PNG: every run's source-validation curve per setting (so each
    convergence verdict can be seen), and ReSTE's indicators per epoch as o rises to 3."""
    from qtool.plots import Panel, write_panels

    panels, error, stability = [], {}, {}
    for setting in settings:
        lines = {}
        for method in METHODS:
            for seed in args.seeds:
                result_file = result_path(args, setting, method, seed)
                if not result_file.exists():
                    continue
                result = json.loads(result_file.read_text())
                curve = result["convergence"]["qat"]["curve"]
                lines[f"{method} seed {seed}"] = ([p["step"] for p in curve], [100 * p["val"] for p in curve])
                history = result["estimator"]
                epochs = list(range(1, len(history["o"]) + 1))
                label = f"{setting.removeprefix('target-')} {method} s{seed}"
                stability[label] = (epochs, history["gradient_stability"])
                if method == "reste":
                    error[label] = (epochs, history["estimating_error"])
        if lines:
            panels.append(Panel(f"{setting}: binary phase", "source-validation accuracy (%)", lines))
    if not panels:
        return None
    panels += [Panel("ReSTE estimating error (o rises 1 -> 3)", "||sign(w) - f(w)||", error, xlabel="epoch"),
               Panel("gradient stability var(|g|) (lower: steadier)", "var(|g|)", stability, xlabel="epoch",
                     yscale="log")]
    return write_panels(path, panels, title=f"binary resnet20, {args.epochs:g} binary epochs")


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(args, settings: list[str]) -> dict:
    """Per setting and method: the headline accuracy (target domain, or source validation with
    every domain a source) over the seeds with both runs finished, plus the paired ReSTE - STE gap."""
    summary = {}
    for setting in settings:
        seeds = [s for s in args.seeds if all(result_path(args, setting, m, s).exists() for m in METHODS)]
        if not seeds:
            continue
        rows, fp = {}, []
        for method in METHODS:
            reports = [json.loads(result_path(args, setting, method, seed).read_text()) for seed in seeds]
            key = "target_accuracy" if reports[0]["target_domain"] else "source_val_accuracy"
            rows[method] = {
                "accuracy": _mean_std([r[key] for r in reports]),
                "source_val_accuracy": _mean_std([r["source_val_accuracy"] for r in reports]),
                "steps": reports[0]["steps"], "seconds": _mean_std([r["seconds"] for r in reports]),
                "final_o": reports[0]["estimator"]["o"][-1],
                "converged": [r["convergence"]["qat"]["converged"] for r in reports],
            }
            fp = [r["full_precision"][key] for r in reports]
        gap = [a - b for a, b in zip(rows["reste"]["accuracy"]["values"], rows["ste"]["accuracy"]["values"])]
        _, low, high = t_interval(gap)
        summary[setting] = {"metric": key, "seeds": seeds, "full_precision": _mean_std(fp), **rows,
                            "reste_minus_ste": {**_mean_std(gap), "interval_95": [low, high]}}
    return summary


def print_summary(summary: dict) -> None:
    pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"  # noqa: E731

    def interval(s: dict) -> str:
        low, high = s["interval_95"]
        return "–" if math.isnan(low) else f"[{100 * low:+.2f}, {100 * high:+.2f}]"  # NaN: one seed

    print("| setting | seeds | metric | FP start | STE | ReSTE | ReSTE − STE (paired) | its 95 % t-interval | "
          "source-val STE / ReSTE | converged STE / ReSTE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting, row in summary.items():
        verdicts = " / ".join(f"{sum(1 for v in row[m]['converged'] if v)}/{len(row[m]['converged'])}"
                              for m in ("ste", "reste"))
        print(f"| {setting} | {len(row['seeds'])} | {row['metric']} | {pct(row['full_precision'])} | "
              f"{pct(row['ste']['accuracy'])} | {pct(row['reste']['accuracy'])} | {pct(row['reste_minus_ste'])} | {interval(row['reste_minus_ste'])} | "
              f"{pct(row['ste']['source_val_accuracy'])} / {pct(row['reste']['source_val_accuracy'])} | {verdicts} |")


def steptime(args) -> None:
    """Median seconds per training step (forward, backward, Adam) of resnet20 in full precision
    and as a binary ReSTE network (o = 2, so the power-function backward runs), interleaved."""
    import torch
    import torch.nn.functional as F

    from qtool.models import build_model
    from qtool.quant.binarize import prepare_binary
    from qtool.quant.binary import binary_layers
    from qtool.timing import interleaved_ms, medians
    from qtool.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = build_model("resnet20")
    models = {"fp32": fp, "binary_reste": prepare_binary(fp), "binary_ste": prepare_binary(fp, estimator="ste")}
    for _, layer in binary_layers(models["binary_reste"]):
        layer.estimator.o = 2.0
    images = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))
    steps = {}
    for name, model in models.items():
        model.to(memory_format=torch.channels_last).train()
        optimizer = build_optimizer("plain", torch.optim.Adam(model.parameters(), lr=1e-4))
        loss_fn = lambda perturbed, model=model: (F.cross_entropy(logits := model(images), labels), logits)  # noqa: E731
        steps[name] = lambda optimizer=optimizer, loss_fn=loss_fn: optimizer.step(loss_fn)
    median_ms = medians(interleaved_ms(steps, args.repeats, warmup=2))
    result = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats,
              "median_s": {name: ms / 1e3 for name, ms in median_ms.items()}}
    result["ratio_vs_fp32"] = {name: value / result["median_s"]["fp32"] for name, value in result["median_s"].items()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("accuracy", help="ReSTE vs STE accuracy over seeds")
    run.add_argument("--out", default="runs/binary-bench", help="run folders (logs, checkpoints, report.json)")
    run.add_argument("--results", default=str(RESULTS),
                     help="compact per-run results, committed to the repository; a run with one here is skipped")
    run.add_argument("--data", default=str(DATA), help="digits_dg.npz (default: ../shared/data from the repository root)")
    run.add_argument("--cache-dir", default=None, help="FP pre-training cache (default OUT/cache)")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    run.add_argument("--target", default="mnist_m", help="held-out domain of the leave-one-domain-out setting")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--epochs", type=float, default=10, help="binary epochs (o reaches 3 in the last)")
    run.add_argument("--pretrain-epochs", type=float, default=20, help="the GAQAT grid's FP budget")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--evals", type=int, default=10, help="model-selection evaluations per phase (the curve's points)")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--summarize", action="store_true", help="only print the table of what --results holds")
    timing = commands.add_parser("steptime", help="binary vs FP training step time")
    timing.add_argument("--threads", type=int, default=1)
    timing.add_argument("--batch", type=int, default=128)
    timing.add_argument("--repeats", type=int, default=15)
    timing.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    {"accuracy": accuracy, "steptime": steptime}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
