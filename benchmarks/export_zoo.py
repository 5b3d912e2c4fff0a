"""Every zoo model, trained by ``qtool quantize``, exported with default options and verified by
``qtool export --verify N`` on its held-out domain: the bar that the exported model is the
trained model.

    python benchmarks/export_zoo.py --out runs/export-zoo --json docs/results/export-zoo.json

Each (model, bits) pair trains a short QAT run (``--steps``, after ``--pretrain-epochs`` of
full-precision pre-training: enough for real decision margins, not for accuracy), then exports
and verifies it. Resumable: a pair whose verification result is in ``--json`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ZOO = ("resnet20", "mobilenetv2", "dg-cnn", "vgg-small", "resnet18")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/digits_dg.npz")
    parser.add_argument("--target-domain", default="mnist_m")
    parser.add_argument("--models", nargs="+", default=list(ZOO))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-epochs", type=float, default=0.3)
    parser.add_argument("--verify", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/export-zoo")
    parser.add_argument("--json", default="docs/results/export-zoo.json")
    args = parser.parse_args(argv)

    results_path = Path(args.json)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for arch in args.models:
        for bits in args.bits:
            key = f"{arch}-w{bits}a{bits}"
            if key in results:
                continue
            folder = Path(args.out) / key
            started = time.time()
            train = run([sys.executable, "-m", "qtool", "quantize", arch, "--data", args.data,
                         "--target-domain", args.target_domain, "--bits", str(bits), "--method", "lsq",
                         "--steps", str(args.steps), "--pretrain-epochs", str(args.pretrain_epochs),
                         "--pretrain-method", "plain", "--threads", str(args.threads), "--evals", "1",
                         "--no-checkpoints", "--out", str(folder)])
            if train.returncode != 0:
                print(f"{key}: training failed: {train.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            report = json.loads((folder / "report.json").read_text())
            exported = run([sys.executable, "-m", "qtool", "export", str(folder / "model.pt"), "-o",
                            str(folder / "model.onnx"), "--verify", str(args.verify), "--threads", str(args.threads),
                            "--json", str(folder / "export.json")])
            verification = None
            if (folder / "export.json").exists():
                export_report = json.loads((folder / "export.json").read_text())
                verification = export_report["verification"]
            results[key] = {
                "model": arch, "bits": bits, "passed": exported.returncode == 0,
                "error": None if exported.returncode == 0 else exported.stderr.strip().splitlines()[-1][:400],
                "target_accuracy": report.get("target_accuracy"), "verification": verification,
                "budget": {"steps": args.steps, "pretrain_epochs": args.pretrain_epochs, "method": "lsq"},
                "seconds": round(time.time() - started, 1),
            }
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2))
            status = "PASS" if exported.returncode == 0 else "FAIL"
            print(f"{key}: {status} {verification and {k: verification[k] for k in ('agreement', 'within_step')}}",
                  flush=True)
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
