"""Data-parallel QAT throughput on this machine: 2 processes (torchrun, gloo, 1 thread each)
against 1 process (2 threads), same global batch, runs interleaved, median of repeats.

Each run is ``qtool quantize`` from the same cached full-precision model; the number compared is
the report's ``throughput.images_per_second`` (training steps only: no start-up, data loading,
evaluation or checkpoint writes). Run it under the shared lock:

    flock /tmp/qtool-heavy.lock python benchmarks/ddp_throughput.py --data ../shared/data/digits_dg.npz
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(args: argparse.Namespace, processes: int, out: Path) -> dict:
    command = [sys.executable, "-m", "qtool", "quantize", args.model, "--data", args.data,
               "--target-domain", args.target, "--bits", str(args.bits), "--method", args.method,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--evals", "1",
               "--pretrain-epochs", str(args.pretrain_epochs), "--no-checkpoints", "--out", str(out)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    command += ["--threads", str(args.cores // processes)] + (["--nproc", str(processes)] if processes > 1 else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    assert report["throughput"]["processes"] == processes
    return {"images_per_second": report["throughput"]["images_per_second"],
            "target_accuracy": report["target_accuracy"], "source_val_accuracy": report["source_val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target", default="mnist_m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--method", default="sagm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=float, default=3)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--cores", type=int, default=2, help="threads of the 1-process run; split over processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows, accuracies = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run(args, 1, Path(tmp) / "warm-up")  # fills the pre-training cache and the kernel build
        for repeat in range(args.repeats):
            one_run = run(args, 1, Path(tmp) / f"one-{repeat}")
            two_run = run(args, 2, Path(tmp) / f"two-{repeat}")
            one, two = one_run["images_per_second"], two_run["images_per_second"]
            rows.append({"one_process": one, "two_processes": two, "ratio": two / one})
            accuracies.append({"one_process": one_run, "two_processes": two_run})
            print(f"repeat {repeat}: 1 process {one:.1f} img/s, 2 processes {two:.1f} img/s, ratio {two / one:.3f}; "
                  f"target accuracy {one_run['target_accuracy']:.4f} vs {two_run['target_accuracy']:.4f}, "
                  f"source val {one_run['source_val_accuracy']:.4f} vs {two_run['source_val_accuracy']:.4f}")
    summary = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    print(f"median: 1 process {summary['one_process']:.1f} img/s, 2 processes {summary['two_processes']:.1f} img/s, "
          f"ratio {summary['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "repeats": rows, "median": summary,
                                               "accuracy": accuracies}, indent=2))


if __name__ == "__main__":
    main()
