"""The paper's two observations, checked on the GAQAT grid's runs: does the disorder of g_task
fall as training proceeds, and do lower layers show more task/smooth sign conflict?

Reads every ``w*-gaqat*.json`` under the grid's results (each holds, per check and per
quantizer, the disorder of g_task and the share of sign conflicts between g_task and g_smooth)
and writes a Markdown summary and a plot:

    python benchmarks/gaqat_disorder.py                      # docs/results/gaqat-converged
    python benchmarks/gaqat_disorder.py --results DIR --out DIR/disorder

Per run: median over quantizers at each check, then the first and last third of the checks;
per depth: quantizers in network order split into thirds (lower / middle / upper), median
conflict over all checks. Runs are summarized by their mean and range.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "gaqat-converged"


def thirds(values: list) -> tuple[list, list, list]:
    n = len(values)
    a, b = n // 3, n - n // 3
    return values[:a], values[a:b], values[b:]


def run_summary(gaqat: dict) -> dict:
    """Medians over quantizers per check; their first/last third; conflict by depth."""
    disorder, conflict = gaqat["disorder"], gaqat["conflict"]  # [checks][quantizers]
    per_check_disorder = [statistics.median(row) for row in disorder]
    per_check_conflict = [statistics.median(row) for row in conflict]
    first, _, last = thirds(per_check_disorder)
    by_depth = [[statistics.median(row[i] for row in conflict) for i in part]
                for part in thirds(list(range(len(conflict[0]))))]
    return {"checks": len(disorder), "disorder_curve": per_check_disorder, "conflict_curve": per_check_conflict,
            "disorder_first_third": statistics.fmean(first), "disorder_last_third": statistics.fmean(last),
            "conflict_lower": statistics.fmean(by_depth[0]), "conflict_middle": statistics.fmean(by_depth[1]),
            "conflict_upper": statistics.fmean(by_depth[2]), "frozen_fraction": gaqat["frozen_fraction"]}


def collect(root: Path) -> dict[str, dict[str, dict]]:
    """run name (w3-gaqat, ...) -> "target/seedN" -> run_summary."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(root.glob("*/seed*/w*-gaqat*.json")):
        report = json.loads(path.read_text())
        if "gaqat" in report and report["gaqat"].get("disorder"):
            found.setdefault(path.stem, {})[f"{path.parent.parent.name}/{path.parent.name}"] = run_summary(report["gaqat"])
    return found


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown(found: dict[str, dict[str, dict]]) -> str:
    lines = ["| run | pairs | disorder, first third of checks | last third | conflict, lower third of layers | "
             "middle | upper | frozen per check |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in sorted(found.items()):
        rows = list(runs.values())
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(fmt([r[k] for r in rows]) for k in (
            "disorder_first_third", "disorder_last_third", "conflict_lower", "conflict_middle", "conflict_upper"))
            + f" | {100 * statistics.fmean(r['frozen_fraction'] for r in rows):.1f}% |")
    return "\n".join(lines)


def plot(found: dict[str, dict[str, dict]], path: Path) -> None:
    from qtool.plots import Panel, write_panels

    def lines(key: str) -> dict[str, tuple[list, list]]:
        return {f"{name} {pair}": (list(range(len(r[key]))), r[key])
                for name, runs in sorted(found.items()) for pair, r in sorted(runs.items())}

    write_panels(path, [Panel("disorder of g_task (median over quantizers)", "disorder", lines("disorder_curve"), "check"),
                        Panel("task/smooth sign conflict (median)", "conflict share", lines("conflict_curve"), "check")])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=None, help="folder for disorder.md and disorder.png (default: --results)")
    args = parser.parse_args(argv)
    found = collect(Path(args.results))
    if not found:
        raise SystemExit(f"error: no GAQAT results with per-check measures under {args.results}")
    out = Path(args.out or args.results)
    text = markdown(found)
    out.mkdir(parents=True, exist_ok=True)
    (out / "disorder.md").write_text(text + "\n")
    plot(found, out / "disorder.png")
    print(text)


if __name__ == "__main__":
    main()
