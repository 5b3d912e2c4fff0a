"""Trained checkpoints exported and verified on this CPU and on emulated ones
(``qtool export --verify N --verify-cpu CPU``): is the exported model exact on every CPU family?

    python benchmarks/export_cpus.py runs/export-zoo*/*/model.pt runs/bench-ckpt/*/model.pt \\
        --json docs/results/export-cpus.json                       # x86 without VNNI (avx2)
    python benchmarks/export_cpus.py CKPT... --cpus neon neondot i8mm --json docs/results/export-cpus-arm.json

Resumable: a checkpoint whose result is in ``--json`` is skipped. ``--summarize`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fused_bench import cpu_identity
from qtool.onnxrt import integer_layers


def cpu_kind() -> str:
    """The host's model name and the flags the ISA choice depends on."""
    cpu = cpu_identity()
    names = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if flag in cpu["flags"].split()]
    return f"{cpu['model']} ({' '.join(names)})"


def export_one(checkpoint: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="export-cpus-") as folder:
        report = Path(folder) / "export.json"
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "qtool", "export", str(checkpoint), "-o", str(Path(folder) / "model.onnx"),
             "--data", args.data, "--target-domain", args.target_domain, "--verify", str(args.verify),
             *(arg for cpu in args.cpus for arg in ("--verify-cpu", cpu)), "--json", str(report)],
            capture_output=True, text=True)
        exported = json.loads(report.read_text()) if report.exists() else None
    return {"passed": done.returncode == 0, "host": cpu_kind(), "seconds": round(time.time() - started, 1),
            "error": None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1][:400],
            "ops": exported and exported["ops"], "verification": exported and exported["verification"]}


def table(results: dict) -> str:
    cpus = next((result["verification"]["emulated"] for result in results.values() if result["verification"]), [])
    names = [check["cpu"].split()[1] for check in cpus]
    header = "".join(f" {name}: top-1 / within one step / largest diff (steps), logits vs this CPU's |" for name in names)
    rows = [f"| checkpoint | integer kernels | this CPU: top-1 / within one step / largest diff (steps) |{header} passed |",
            "|---|---|---|" + "---|" * len(names) + "---|"]

    def scores(check: dict) -> str:
        return (f"{100 * check['agreement']:.1f} % / {100 * check['within_step']:.1f} % / "
                f"{check['max_abs_diff'] / check['output_step']:.1f}")

    for name, result in results.items():
        check = result["verification"]
        if check is None:
            rows.append(f"| {name} | - | - |" + " - |" * len(names) + f" no: {result['error']} |")
            continue
        kernels = sum(integer_layers(result["ops"]).values())
        emulated = "".join(f" {scores(other)}, {'bit-identical' if other['identical_to_this_cpu'] else 'differ'}"
                           f"{', int16 pair sums' if other['pair_sums_saturate'] else ''} |" for other in check["emulated"])
        rows.append(f"| {name} | {kernels} | {scores(check)} |{emulated} {'yes' if result['passed'] else 'no'} |")
    hosts = sorted({result["host"] for result in results.values()})
    described = "; ".join(check["cpu"] + (", against PyTorch with ARM's QLinearAdd arithmetic" if
                                          check.get("joins_as") == "arm" else "") for check in cpus)
    return "\n".join(rows) + f"\n\nHost CPU: {'; '.join(hosts)}. Emulated: {described}. Samples per check: " + \
        ", ".join(sorted({str(r["verification"]["samples"]) for r in results.values() if r["verification"]}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--data", default="../shared/data/digits_dg.npz")
    parser.add_argument("--target-domain", default="mnist_m")
    parser.add_argument("--verify", type=int, default=200)
    parser.add_argument("--cpus", nargs="+", default=["avx2"], help="CPUs to emulate (qtool.emulated_cpu.CPUS)")
    parser.add_argument("--json", default="docs/results/export-cpus.json")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args(argv)

    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    for checkpoint in [] if args.summarize else args.checkpoints:
        name = f"{checkpoint.parent.parent.name}/{checkpoint.parent.name}"
        if name in results:
            continue
        results[name] = export_one(checkpoint, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"{name}: {'PASS' if results[name]['passed'] else 'FAIL'} ({results[name]['seconds']} s)", flush=True)
    print(table(results))
    return 0 if all(result["passed"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
