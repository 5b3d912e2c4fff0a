"""Did a run converge? Its source-validation curve (one point per model-selection evaluation),
the rule that reads it, and the budget it had.

Rule (issue 13): a run has converged when the last third of its curve gains less than
``GAIN_POINTS`` accuracy points. The last third is the evaluations after 2/3 of the run's final
step; its gain is its best mean source-validation accuracy minus the best before it, so a noisy
dip at the end cannot hide a rise and model selection (which keeps the best) sees the same numbers.
"""

from __future__ import annotations

GAIN_POINTS = 0.5
RULE = (f"converged: the last third of the run (evaluations after 2/3 of its steps) raised the best mean "
        f"source-validation accuracy by less than {GAIN_POINTS} points")


def curve(history: list[dict]) -> list[dict]:
    """The model-selection records of a ``TrainResult.history`` as curve points."""
    return [{"step": r["step"], "epoch": r.get("epoch"), "val": r["val"], "per_domain": r.get("val_per_domain", {})}
            for r in history if "val" in r]


def last_third_gain(points: list[dict]) -> float | None:
    """Points of accuracy the last third of the curve added; None with fewer than 3 evaluations."""
    if len(points) < 3:
        return None
    cut = 2 * points[-1]["step"] / 3
    before = [p["val"] for p in points if p["step"] <= cut]
    after = [p["val"] for p in points if p["step"] > cut]
    if not before or not after:
        return None
    return 100 * (max(after) - max(before))


def convergence(history: list[dict], budget: dict) -> dict:
    """The report entry of one training phase: curve, gain of its last third, verdict, budget."""
    points = curve(history)
    gain = last_third_gain(points)
    return {"curve": points, "last_third_gain": None if gain is None else round(gain, 3),
            "converged": None if gain is None else gain < GAIN_POINTS, "budget": budget}


def verdict(entry: dict) -> str:
    """A phase's verdict in words: "converged (last third +0.21 pts)", "NOT converged (...)"."""
    gain = entry.get("last_third_gain")
    word = {True: "converged", False: "NOT converged", None: "too few evaluations"}[entry.get("converged")]
    return word + (f" (last third {gain:+.2f} pts)" if gain is not None else "")


def write_curve_plot(path, phases: dict[str, dict]) -> object:
    """``convergence.png``: one panel per phase (pre-training, QAT) with the mean and per-domain curves."""
    from qtool.plots import Panel, write_panels

    panels = []
    for phase, entry in phases.items():
        points = entry.get("curve") or []
        if not points:
            continue
        steps = [p["step"] for p in points]
        lines = {"mean": (steps, [100 * p["val"] for p in points])}
        for domain in points[0]["per_domain"]:
            lines[domain] = (steps, [100 * p["per_domain"][domain] for p in points])
        budget = entry.get("budget") or {}
        panels.append(Panel(f"{phase}: {verdict(entry)}"
                            + (f", {budget['epochs']:g} epochs = {budget['steps']} steps" if budget else ""),
                            "source-validation accuracy (%)", lines))
    if not panels:
        return None
    return write_panels(path, panels, title="Model-selection curve")
