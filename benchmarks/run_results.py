"""What the benchmark grids keep of a ``qtool quantize`` run in the repository (docs/results/):
a compact copy of its report.json, written atomically, so that a grid killed at any moment
leaves only whole results and its next invocation skips them; and the paired statistic their
summaries print."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

KEEP = ("model", "method", "bits", "act_bits", "seed", "target_domain", "source_domains", "accuracy",
        "target_accuracy", "source_val_accuracy", "steps", "seconds", "selected_step", "convergence", "gaqat",
        "estimator")


def compact(report: dict, command_line: str, device: str) -> dict:
    """Accuracies, the convergence record (curves, verdicts, budget), GAQAT's measures per check
    and quantizer, ReSTE's indicators per epoch, the FP start, and how the run was made."""
    found = {key: report[key] for key in KEEP if key in report}
    fp = report.get("full_precision", {})
    found["full_precision"] = {k: fp[k] for k in ("accuracy", "target_accuracy", "source_val_accuracy", "pretrain_key")
                               if k in fp}
    return {**found, "device": device, "command": command_line}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)  # a killed grid never leaves half a result (which would be skipped)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of ``values`` (paired differences: one per target and seed)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
