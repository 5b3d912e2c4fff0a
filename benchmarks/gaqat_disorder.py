"""The paper's two observations, checked on the GAQAT grid's runs: does the disorder of g_task
fall as training proceeds, and do lower layers show more task/smooth sign conflict?

Reads every ``w*-gaqat*.json`` under the grid's results (each holds, per check and per
quantizer, the disorder of g_task and the share of sign conflicts between g_task and g_smooth)
and writes a Markdown summary, the curves of both measures per rule (``disorder.png``) and, per
rule, maps of both measures per quantizer over the whole run (``disorder-<rule>-<measure>.png``):

    python benchmarks/gaqat_disorder.py                      # docs/results/gaqat-converged
    python benchmarks/gaqat_disorder.py --results DIR --out DIR/disorder

Per run: median over quantizers at each check, then the first and last third of the checks;
per depth: quantizers in network depth (as the run recorded it, or the order one forward pass
of the rebuilt model reaches them) split into thirds (lower / middle / upper), median conflict
and disorder over all checks. Runs are summarized by their mean and range.
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


def depth_order(report: dict) -> list[str] | None:
    """The report's quantizers in network depth: as the run recorded it (``depth_order``), else
    from one forward pass of the same prepared model, or None when that model cannot be rebuilt
    with the same quantizers. ``layers`` is registration order, which lists every weight
    quantizer before every tensor quantizer."""
    if report["gaqat"].get("depth_order"):
        return report["gaqat"]["depth_order"]
    import torch

    from qtool.models import build_model
    from qtool.quant.prepare import prepare
    from qtool.quant.scales import execution_order

    key = (report.get("model"), report.get("bits"), report.get("act_bits"))
    if key not in _ORDERS:
        try:  # class count and input size do not change the quantizers' names
            model = prepare(build_model(key[0], 10, 3), key[1], key[2])
            _ORDERS[key] = execution_order(model, torch.randn(2, 3, 32, 32))
        except Exception:  # an architecture this script cannot rebuild: keep the recorded order
            _ORDERS[key] = None
    order = _ORDERS[key]
    return order if order is not None and sorted(order) == sorted(report["gaqat"].get("layers", [])) else None


_ORDERS: dict[tuple, list[str] | None] = {}


def run_summary(gaqat: dict, order: list[str] | None = None) -> dict:
    """Medians over quantizers per check; their first/last third; conflict by depth (lower /
    middle / upper third of the quantizers in ``order``, the recorded order without one); the
    [checks][quantizers] measures in that order for the per-quantizer maps."""
    from qtool.train.gaqat import by_depth

    names = gaqat.get("layers") or [f"quantizer {i}" for i in range(len(gaqat["disorder"][0]))]
    columns = by_depth(names, order or [])
    disorder = [[row[i] for i in columns] for row in gaqat["disorder"]]  # [checks][quantizers]
    conflict = [[row[i] for i in columns] for row in gaqat["conflict"]]
    per_check_disorder = [statistics.median(row) for row in disorder]
    per_check_conflict = [statistics.median(row) for row in conflict]
    first, _, last = thirds(per_check_disorder)
    depth = thirds(list(range(len(columns))))
    by_depth = {f"{measure}_{part}": statistics.fmean(statistics.median(row[i] for row in table) for i in indices)
                for measure, table in (("conflict", conflict), ("disorder", disorder))
                for part, indices in zip(("lower", "middle", "upper"), depth)}
    return {"checks": len(disorder), "disorder_curve": per_check_disorder, "conflict_curve": per_check_conflict,
            "disorder_first_third": statistics.fmean(first), "disorder_last_third": statistics.fmean(last),
            **by_depth, "frozen_fraction": gaqat["frozen_fraction"],
            "disorder": disorder, "conflict": conflict, "quantizers": [names[i] for i in columns],
            "by_depth": order is not None}


def collect(root: Path) -> dict[str, dict[str, dict]]:
    """run name (w3-gaqat, ...) -> "target/seedN" -> run_summary, quantizers in network depth."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(root.glob("*/seed*/w*-gaqat*.json")):
        report = json.loads(path.read_text())
        if "gaqat" in report and report["gaqat"].get("disorder"):
            summary = run_summary(report["gaqat"], depth_order(report))
            found.setdefault(path.stem, {})[f"{path.parent.parent.name}/{path.parent.name}"] = summary
    return found


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


COLUMNS = {"disorder_first_third": "disorder, first third of checks", "disorder_last_third": "last third",
           "disorder_lower": "disorder, lower third of quantizers", "disorder_middle": "middle",
           "disorder_upper": "upper", "conflict_lower": "conflict, lower third", "conflict_middle": "middle",
           "conflict_upper": "upper"}


def markdown(found: dict[str, dict[str, dict]]) -> str:
    lines = ["| run | pairs | " + " | ".join(COLUMNS.values()) + " | frozen per check |", "|---" * (len(COLUMNS) + 3) + "|"]
    for name, runs in sorted(found.items()):
        rows = list(runs.values())
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(fmt([r[k] for r in rows]) for k in COLUMNS)
                     + f" | {100 * statistics.fmean(r['frozen_fraction'] for r in rows):.1f}% |")
    by_depth = all(r["by_depth"] for runs in found.values() for r in runs.values())
    lines += ["", "Lower / middle / upper: thirds of the quantizers in "
              + ("network depth (the order a forward pass reaches them)." if by_depth else
                 "the order the reports record (some models could not be rebuilt to order them by depth).")]
    return "\n".join(lines)


def mean_over_pairs(runs: dict[str, dict], key: str) -> list:
    """Element-wise mean of one measure (a curve, or a [checks][quantizers] table) over the pairs,
    over the checks all pairs have (a resumed run can record fewer)."""
    tables = [r[key] for r in runs.values()]
    checks = min(len(t) for t in tables)
    if isinstance(tables[0][0], list):
        return [[statistics.fmean(t[c][q] for t in tables) for q in range(len(tables[0][0]))] for c in range(checks)]
    return [statistics.fmean(t[c] for t in tables) for c in range(checks)]


def plot(found: dict[str, dict[str, dict]], path: Path) -> list[Path]:
    """``path``: per rule, the mean over its pairs of the per-check medians (disorder and conflict);
    ``<stem>-<rule>-<measure>.png``: per quantizer (rows, network depth where known) and check
    (columns), the mean over the pairs of the disorder of g_task and of the task/smooth conflict. All pairs of a rule share the
    model, so their quantizers line up."""
    from qtool.plots import Panel, write_heatmap, write_panels

    def curves(key: str) -> dict[str, tuple[list, list]]:
        return {f"{name} ({len(runs)} pairs)": (list(range(len(curve))), curve)
                for name, runs in sorted(found.items()) for curve in [mean_over_pairs(runs, key)]}

    written = [write_panels(path, [
        Panel("disorder of g_task: median over quantizers, mean over pairs", "disorder", curves("disorder_curve"), "check"),
        Panel("task/smooth sign conflict: median over quantizers, mean over pairs", "conflict share",
              curves("conflict_curve"), "check")])]
    for name, runs in sorted(found.items()):
        quantizers = next(iter(runs.values()))["quantizers"]
        if any(r["quantizers"] != quantizers for r in runs.values()):
            continue  # different models: no per-quantizer mean
        for key, label in (("disorder", "disorder of g_task"), ("conflict", "task/smooth sign conflict")):
            table = mean_over_pairs(runs, key)
            written.append(write_heatmap(path.with_name(f"{path.stem}-{name}-{key}.png"), table, quantizers,
                                         [str(c) for c in range(len(table))],
                                         title=f"{name}: {label} per quantizer, mean over {len(runs)} pairs",
                                         colorbar=label, xlabel="check"))
    return written


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
