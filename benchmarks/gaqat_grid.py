"""GAQAT against direct DG-QAT on digits_dg at convergence: the leave-one-domain-out grid, paired
differences, and GAQAT's step-time overhead over SAGM.

    # 1. the full-precision starts only (one per target and seed), in this one process, resumable
    nice -n 5 python benchmarks/gaqat_grid.py --pretrain-only --cache-dir runs/grid-cache
    # 2. check that this checkout finds those starts (e.g. launched from a newer commit), then
    python benchmarks/gaqat_grid.py --check-starts --cache-dir runs/grid-cache
    # 3. the QAT grid from those starts (3 targets x 3 seeds; W4A4 and W3A3 x lsq/sagm/gaqat/gaqat-layer;
    #    FP SAGM with the same steps; paired GAQAT/SAGM runs first), then the overhead and the tables
    python benchmarks/gaqat_grid.py --cache-dir runs/grid-cache --workers 2
    # an ablation variant of GAQAT on the same grid (the other runs are reused)
    python benchmarks/gaqat_grid.py --cache-dir runs/grid-cache --methods gaqat \\
        --variant smooth-frozen:freeze=smooth --bits 3 --no-overhead
    # on a GPU machine: the same grid, one invocation under a hard time limit
    timeout 3000 python benchmarks/gaqat_grid.py --device cuda --workers 1 --cache-dir runs/grid-cache
    # CI-sized smoke run (one target, one seed, W4A4, a few steps)
    python benchmarks/gaqat_grid.py --quick --out runs/gaqat-quick --results runs/gaqat-quick/results

Every (target, seed) pair starts all its runs from one cached full-precision model (pre-trained
by ``--pretrain-only`` or by the pair's first job) and every run of the pair sees the same
batches, so ``gaqat - sagm`` per pair cancels most seed noise. The cache key depends on the
settings alone (``qtool.pipeline.PRETRAIN_SETTINGS``), so a later checkout with the same
``--cache-dir`` and options reuses the starts.

Resumable into the repository: every finished run writes a compact copy of its report.json
(accuracies, convergence curves and verdicts, budget, GAQAT summary) to
``--results/<target>/seed<N>/<name>.json`` (``fp-pretrain.json`` for the start); a run whose
result exists is skipped, and an interrupted pre-training continues from its checkpoint.
QAT runs are ``qtool quantize`` commands, ``--workers`` at a time with ``--threads`` each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from run_results import compact, t_interval, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "digits_dg.npz"  # the README's ../shared, from the repository root
RESULTS = REPO / "docs" / "results" / "gaqat-converged"
TARGETS = ("mnist", "mnist_m", "syn")
FP = "fp32-sagm"  # full precision, SAGM, the same QAT steps
PRETRAIN = "fp-pretrain"  # the pair's full-precision start (the --pretrain-only phase)
DEFAULT_VARIANTS = ["layer:freeze=layer"]  # FQAT's layer-wise freezing, with its defaults


@dataclass
class Job:
    target: str
    seed: int
    name: str  # fp32-sagm, w4-sagm, w3-gaqat, w4-gaqat-<variant>, ...
    bits: int
    method: str
    options: list[str] = field(default_factory=list)  # -O KEY=VALUE

    def out(self, root: Path) -> Path:
        return root / self.target / f"seed{self.seed}" / self.name

    def result(self, args) -> Path:
        return result_path(args, self.target, self.seed, self.name)


def result_path(args, target: str, seed: int, name: str) -> Path:
    return Path(args.results) / target / f"seed{seed}" / f"{name}.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gaqat-grid", help="run folders (logs, checkpoints, report.json)")
    parser.add_argument("--results", default=str(RESULTS),
                        help="compact per-run results, committed to the repository; a run with one here is skipped")
    parser.add_argument("--data", default=str(DATA), help="digits_dg.npz (default: ../shared/data from the repository root)")
    parser.add_argument("--cache-dir", default=None, help="FP pre-training cache (default OUT/cache)")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="only train (or resume) the cached FP start of every (target, seed), in this process")
    parser.add_argument("--check-starts", action="store_true",
                        help="only say, per (target, seed), whether --cache-dir holds the FP start these options ask for")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="passed to qtool quantize")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--methods", nargs="+", default=["lsq", "sagm", "gaqat"])
    parser.add_argument("--variant", action="append", default=None, metavar="NAME:K=V,K=V",
                        help="a GAQAT variant run as method gaqat-NAME with these -O options (repeatable; "
                             f"default with --methods gaqat: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--epochs", type=float, default=5.0, help="QAT (and FP-same-steps) epochs per run")
    parser.add_argument("--steps", type=int, default=None, help="QAT steps per run (overrides --epochs)")
    parser.add_argument("--pretrain-epochs", type=float, default=20.0,
                        help="10 did not converge: docs/results/pretrain-defaults.md")
    parser.add_argument("--pretrain-method", default="plain", help="optimizer of the FP pre-training")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="QAT learning rate (default: qtool's)")
    parser.add_argument("--evals", type=int, default=10, help="model-selection evaluations per phase (the curve's points)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-overhead", action="store_true", help="skip the step-time measurement")
    parser.add_argument("--summarize", action="store_true",
                        help="only print the tables of what --results holds (nothing runs)")
    parser.add_argument("--overhead-steps", type=int, default=12, help="timed steps per method and repeat")
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--gaqat-option", action="append", default=[], metavar="K=V",
                        help="-O option for every GAQAT run, variants included (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized smoke run: 1 target, 1 seed, W4A4, 12 steps, GAQAT checks every 4 steps")
    args = parser.parse_args(argv)
    if args.variant is None:  # the default variants join a grid that runs gaqat
        args.variant = list(DEFAULT_VARIANTS) if "gaqat" in args.methods else []
    if args.quick:
        args.targets, args.seeds, args.bits = ["mnist_m"], [0], [4]
        args.steps, args.pretrain_epochs, args.batch_size, args.evals = 12, 0.05, 32, 3
        args.overhead_steps, args.overhead_repeats = 3, 2
        args.gaqat_option = ["window=4", "every=4", *args.gaqat_option]
    return args


def variants(args) -> dict[str, list[str]]:
    """method name -> GAQAT -O options; ``gaqat`` itself runs with the defaults."""
    found = {}
    for spec in args.variant:
        name, _, options = spec.partition(":")
        found[f"gaqat-{name}"] = [item for item in options.split(",") if item]
    return found


def plan(args) -> list[Job]:
    """Every job, most informative first, so that a grid stopped part-way (it takes days on two
    cores) leaves whole paired comparisons over all (target, seed) pairs: GAQAT and SAGM at each
    bit width (lowest first), then FP SAGM with the same steps (the bar's reference), then the
    GAQAT variants (the rule to keep), then LSQ."""
    extra = variants(args)
    methods = list(dict.fromkeys([*args.methods, *extra]))
    stages = [[(bits, m) for m in ("sagm", "gaqat") if m in methods] for bits in sorted(args.bits)]
    stages.append([(32, FP)])
    stages += [[(bits, m) for m in extra] for bits in sorted(args.bits)]
    stages.append([(bits, m) for bits in sorted(args.bits) for m in methods if m not in ("sagm", "gaqat", *extra)])
    jobs = []
    for stage in stages:
        for seed in args.seeds:
            for target in args.targets:
                jobs += [_job(args, target, seed, bits, method, extra) for bits, method in stage]
    return jobs


def _job(args, target: str, seed: int, bits: int, method: str, extra: dict[str, list[str]]) -> Job:
    if method == FP:
        return Job(target, seed, FP, 32, "sagm")
    base = "gaqat" if method.startswith("gaqat") else method
    options = [*args.gaqat_option, *extra.get(method, [])] if base == "gaqat" else []
    return Job(target, seed, f"w{bits}-{method}", bits, base, options)


def budget_flags(args) -> list[str]:
    """The QAT budget, as qtool quantize flags."""
    return ["--steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]


def command(args, job: Job) -> list[str]:
    """The job's qtool quantize command; its pre-training flags match ``pretrain_options``, so it
    finds the start that the --pretrain-only phase cached."""
    root = Path(args.out)
    cmd = [sys.executable, "-m", "qtool", "quantize", "resnet20", "--data", args.data, "--target-domain", job.target,
           "--bits", str(job.bits), "--method", job.method, *budget_flags(args),
           "--pretrain-epochs", str(float(args.pretrain_epochs)), "--pretrain-method", args.pretrain_method,
           "--batch-size", str(args.batch_size), "--seed", str(job.seed), "--evals", str(args.evals),
           "--threads", str(args.threads), "--device", args.device,
           "--cache-dir", cache_dir(args), "--out", str(job.out(root))]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    for option in job.options:
        cmd += ["-O", option]
    return cmd


def cache_dir(args) -> str:
    return args.cache_dir or str(Path(args.out) / "cache")


def run_job(args, job: Job) -> float:
    if job.result(args).exists():
        return 0.0
    out = job.out(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(args, job)
    start = time.perf_counter()
    with open(out / "log.txt", "a") as log:
        log.write(" ".join(cmd[1:]) + "\n")
        log.flush()
        killed = any((out / "checkpoints" / f"{phase}.pt").exists() for phase in ("pretrain", "qat"))
        resume = ["--resume", str(out)] if killed else []  # continue where it stopped
        result = subprocess.run(cmd + resume, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        write_result(job.result(args), compact(report, " ".join(cmd[1:]), args.device))
    print(f"{'ok ' if result.returncode == 0 else f'FAILED ({result.returncode})'} {seconds:6.0f} s  {out}", flush=True)
    return seconds


def run_grid(args) -> float:
    """The unfinished jobs in ``plan`` order, ``--workers`` at a time. A pair whose start is not
    cached yet runs one job at a time until that job has pre-trained (and cached) it."""
    todo = [job for job in plan(args) if not job.result(args).exists()]
    started = cached_starts(args, {(job.target, job.seed) for job in todo})
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        running: dict[Future, Job] = {}
        while todo or running:
            busy = {(job.target, job.seed) for job in running.values()}
            while todo and len(running) < args.workers:
                ready = next((job for job in todo if (job.target, job.seed) in started
                              or (job.target, job.seed) not in busy), None)
                if ready is None:
                    break
                todo.remove(ready)
                busy.add((ready.target, ready.seed))
                running[pool.submit(run_job, args, ready)] = ready
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                future.result()
                started.add((job.target, job.seed))
    return time.perf_counter() - start


def cached_starts(args, pairs: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """The (target, seed) pairs whose FP start the cache holds under this checkout's key."""
    from qtool.data import load_domains
    from qtool.pipeline import pretrain_key

    data = load_domains(args.data)
    return {(target, seed) for target, seed in pairs
            if start_path(args, pretrain_key(pretrain_options(args, target, seed), data)).exists()}


def start_path(args, key: str) -> Path:
    return Path(cache_dir(args)) / f"resnet20-{key}.pt"


# -- the pre-training phase -------------------------------------------------------------------

def pretrain_options(args, target: str, seed: int):
    """The QuantizeOptions of the pair's FP start: the same pre-training settings as ``command``."""
    from qtool.options import QuantizeOptions

    out = Path(args.out) / target / f"seed{seed}" / PRETRAIN
    resume = str(out) if (out / "checkpoints" / "pretrain.pt").exists() else None  # killed before: continue
    return QuantizeOptions(model="resnet20", out=str(out), data=args.data, target_domain=target, seed=seed,
                           pretrain_epochs=float(args.pretrain_epochs), pretrain_method=args.pretrain_method,
                           batch_size=args.batch_size, evals=args.evals, cache_dir=cache_dir(args),
                           device=args.device, threads=args.threads, resume=resume)


def run_pretraining(args) -> float:
    """Every pair's FP start, one after the other in this process (resumable: a finished start is
    skipped, an interrupted one continues from its last epoch checkpoint)."""
    from qtool.pipeline import pretrain
    from qtool.train.convergence import write_curve_plot

    start = time.perf_counter()
    for seed in args.seeds:
        for target in args.targets:
            path = result_path(args, target, seed, PRETRAIN)
            if path.exists():
                print(f"skip (done): {path}", flush=True)
                continue
            options = pretrain_options(args, target, seed)
            print(f"pretrain {target} seed {seed}{' (resumed)' if options.resume else ''} -> {options.out}", flush=True)
            begin = time.perf_counter()
            report = pretrain(options, progress=lambda record, name=f"{target}/seed{seed}": log_progress(name, record))
            seconds = time.perf_counter() - begin
            record = {"model": "resnet20", "target_domain": target, "seed": seed, "pretrain_method": args.pretrain_method,
                      **{k: report[k] for k in ("accuracy", "target_accuracy", "source_val_accuracy", "steps",
                                                "seconds", "pretrain_key", "convergence") if k in report},
                      "wall_seconds_this_invocation": round(seconds, 1), "device": args.device, "threads": args.threads}
            write_result(path, record)
            if "convergence" in report:
                write_curve_plot(Path(options.out) / "convergence.png", {"pretrain": report["convergence"]})
            verdict = record.get("convergence", {}).get("converged")
            print(f"done {target} seed {seed}: source-val {100 * report['source_val_accuracy']:.2f} %, "
                  f"converged {verdict}, {seconds:.0f} s", flush=True)
    return time.perf_counter() - start


def check_starts(args) -> bool:
    """Whether the cache holds every pair's start under this checkout's key (a QAT phase launched
    from a newer commit reuses the starts only if the key function and the settings agree)."""
    from qtool.data import load_domains
    from qtool.pipeline import pretrain_key

    data = load_domains(args.data)
    found = True
    for seed in args.seeds:
        for target in args.targets:
            path = start_path(args, pretrain_key(pretrain_options(args, target, seed), data))
            found &= path.exists()
            print(f"{target} seed {seed}: {'cached' if path.exists() else 'MISSING'} {path}", flush=True)
    return found


def log_progress(name: str, record: dict) -> None:
    """One line per model-selection evaluation (and where the start came from)."""
    if "cached" in record:
        print(f"  {name}: cached {record['cached']}", flush=True)
    elif "val" in record:
        per_domain = ", ".join(f"{k} {100 * v:.2f}" for k, v in record.get("val_per_domain", {}).items())
        print(f"  {name}: step {record['step']} epoch {record.get('epoch')}: val {100 * record['val']:.2f} "
              f"({per_domain}) {time.strftime('%H:%M:%S')}", flush=True)


# -- step-time overhead ---------------------------------------------------------------------

def measure_overhead(args) -> dict:
    """SAGM and GAQAT training steps on the same W4A4 resnet20 and batch, interleaved: each repeat
    times ``--overhead-steps`` steps without the GAQAT hook, then as many with it."""
    import torch
    import torch.nn.functional as F

    from qtool.models import resnet20
    from qtool.quant.prepare import prepare
    from qtool.quant.scales import scale_parameters
    from qtool.train.gaqat import GAQAT, GAQATConfig
    from qtool.train.optim import SAGM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))
    model = prepare(resnet20(), 4, 4).to(memory_format=torch.channels_last)
    model(images)  # initialise the step sizes
    optimizer = SAGM(torch.optim.Adam(model.parameters(), lr=1e-5))
    gaqat = GAQAT(scale_parameters(model), GAQATConfig())

    def loss_fn(perturbed):
        logits = model(images)
        return F.cross_entropy(logits, labels), logits

    def timed(hooks) -> float:
        optimizer.hooks = hooks
        start = time.perf_counter()
        for _ in range(args.overhead_steps):
            optimizer.step(loss_fn)
        return (time.perf_counter() - start) / args.overhead_steps

    timed([]), timed([gaqat])  # warm-up
    sagm, with_gaqat = [], []
    for _ in range(args.overhead_repeats):
        sagm.append(timed([]))
        with_gaqat.append(timed([gaqat]))
    ratios = [g / s for g, s in zip(with_gaqat, sagm)]
    return {"batch_size": args.batch_size, "threads": 1, "steps_per_repeat": args.overhead_steps,
            "sagm_s": statistics.median(sagm), "gaqat_s": statistics.median(with_gaqat),
            "ratio_median": statistics.median(ratios), "ratios": ratios}


# -- summary --------------------------------------------------------------------------------

def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def collect(args) -> dict[str, dict[tuple[str, int], float]]:
    """config -> (target, seed) -> target accuracy in %, for every finished run under --results."""
    root = Path(args.results)
    table: dict[str, dict[tuple[str, int], float]] = {}
    for path in sorted(root.glob("*/seed*/*.json")):
        report = json.loads(path.read_text())
        name = path.stem
        key = (report["target_domain"], report["seed"])
        if name == PRETRAIN:  # the pair's FP start
            table.setdefault("fp32-sagm-start", {})[key] = 100 * report["target_accuracy"]
            continue
        table.setdefault(name, {})[key] = 100 * report["target_accuracy"]
        verdict = report.get("convergence", {}).get("qat", {}).get("converged")
        if verdict is not None:
            table.setdefault(f"{name}:converged", {})[key] = float(verdict)
        if "gaqat" in report:
            table.setdefault(f"{name}:frozen", {})[key] = 100 * report["gaqat"]["frozen_fraction"]
    return table


def comparisons(names) -> list[tuple[str, str]]:
    """The paired differences the tables report, as (run, baseline) names: every GAQAT rule against
    SAGM at its bit width (and W4A4 against FP SAGM, the bar), every variant rule against the default
    rule, full-precision SAGM against quantized SAGM (the paper's premise), and SAGM against LSQ."""
    names = sorted(set(names))
    quantized = [n for n in names if n.startswith("w")]
    pairs = []
    for name in (n for n in quantized if "gaqat" in n):
        width = name.split("-")[0]
        pairs += [(name, f"{width}-sagm")] + ([(name, FP)] if width == "w4" else [])
        if name != f"{width}-gaqat":
            pairs.append((name, f"{width}-gaqat"))
    pairs += [(FP, n) for n in quantized if n.endswith("-sagm")]
    pairs += [(n, n.replace("-sagm", "-lsq")) for n in quantized if n.endswith("-sagm")]
    return pairs


def summarize(args, table, grid_seconds: float | None, overhead: dict | None) -> str:
    targets, seeds = args.targets, args.seeds
    lines = ["| run | " + " | ".join(targets) + " | mean over targets |", "|---" * (len(targets) + 2) + "|"]
    order = ["fp32-sagm-start", FP] + sorted(n for n in table if n not in (FP, "fp32-sagm-start") and ":" not in n)
    for name in order:
        runs = table.get(name, {})
        cells = [mean_std([runs[(t, s)] for s in seeds if (t, s) in runs]) for t in targets]
        per_seed = [statistics.fmean(runs[(t, s)] for t in targets) for s in seeds if all((t, s) in runs for t in targets)]
        label = {"fp32-sagm-start": "FP start (the pair's pre-training)", FP: "FP SAGM + same steps"}.get(name, name)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_std(per_seed)} |")
    lines += ["", "Paired differences in target accuracy (points), per (target, seed); mean and 95% t-interval:", "",
              "| comparison | pairs | mean | 95% interval | per pair |", "|---|---|---|---|---|"]
    for name, baseline in comparisons(n for n in table if ":" not in n):
        common = [k for k in table.get(name, {}) if k in table.get(baseline, {})]
        if not common:
            continue
        diffs = [table[name][k] - table[baseline][k] for k in sorted(common)]
        mean, low, high = t_interval(diffs)
        lines.append(f"| {name} − {baseline} | {len(diffs)} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                     + " ".join(f"{d:+.1f}" for d in diffs) + " |")
    converged = {n.split(":")[0]: v for n, v in table.items() if n.endswith(":converged")}
    if converged:
        lines += ["", "QAT phases converged by the rule (last third gains < 0.5 points): "
                  + ", ".join(f"{n} {int(sum(v.values()))}/{len(v)}" for n, v in sorted(converged.items()))]
    frozen = {n.split(":")[0]: statistics.fmean(v.values()) for n, v in table.items() if n.endswith(":frozen")}
    if frozen:
        lines += ["", "Mean share of quantizers frozen per check: "
                  + ", ".join(f"{n} {v:.0f}%" for n, v in sorted(frozen.items()))]
    if grid_seconds is not None:
        lines += ["", f"Grid wall time (this invocation): {grid_seconds / 60:.1f} min with {args.workers} workers x 1 thread"]
    if overhead:
        lines += ["", f"Step time, W4A4 resnet20, batch {overhead['batch_size']}, 1 thread, interleaved "
                      f"{args.overhead_repeats} x {overhead['steps_per_repeat']} steps: SAGM {overhead['sagm_s']:.3f} s, "
                      f"GAQAT {overhead['gaqat_s']:.3f} s, ratio median {overhead['ratio_median']:.3f}x "
                      f"(repeats {', '.join(f'{r:.3f}' for r in overhead['ratios'])})"]
    return "\n".join(lines)


def write_curves(args, path: Path):
    """One panel per run name: the QAT source-validation curve of every (target, seed) pair, so the
    tables' convergence can be seen (the verdicts are in each result's ``convergence``)."""
    from qtool.plots import Panel, write_panels

    runs: dict[str, dict[str, tuple[list, list]]] = {}
    for result in sorted(Path(args.results).glob("*/seed*/*.json")):
        curve = json.loads(result.read_text()).get("convergence", {}).get("qat", {}).get("curve")
        if curve:
            label = f"{result.parent.parent.name}/{result.parent.name}"
            runs.setdefault(result.stem, {})[label] = ([p["step"] for p in curve], [100 * p["val"] for p in curve])
    if not runs:
        return None
    return write_panels(path, [Panel(name, "source-validation accuracy (%)", lines) for name, lines in sorted(runs.items())],
                        title="QAT model-selection curves (per target/seed)")


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.check_starts:
        sys.exit(0 if check_starts(args) else 1)
    if args.summarize:
        print(summarize(args, collect(args), None, None))
        print(f"curves: {write_curves(args, Path(args.results) / 'curves.png')}")
        return
    if args.pretrain_only:
        seconds = run_pretraining(args)
        print(f"pre-training phase: {seconds / 60:.1f} min", flush=True)
        return
    grid_seconds = run_grid(args)
    overhead = None if args.no_overhead else measure_overhead(args)
    table = collect(args)
    text = summarize(args, table, grid_seconds, overhead)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (root / f"summary-{stamp}.md").write_text(text + "\n")
    (root / f"summary-{stamp}.json").write_text(json.dumps({
        "argv": sys.argv, "grid_seconds": grid_seconds, "overhead": overhead,
        "target_accuracy": {name: {f"{t}/{s}": v for (t, s), v in runs.items()} for name, runs in table.items()},
    }, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
