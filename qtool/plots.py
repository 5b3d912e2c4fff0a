"""PNG figures written next to report.json (GAQAT's per-layer heatmap, convergence curves, ...).

Every figure qtool draws comes from here: matplotlib's object API with the Agg canvas directly,
never pyplot, so no global backend is switched and no display is needed, and a training run on a
headless machine (or inside a user's notebook) is not affected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtool.atomic import atomic_path


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


@dataclass
class Panel:
    """One line chart: ``lines`` maps a label to its (x, y) values."""

    title: str
    ylabel: str
    lines: dict[str, tuple[list[float], list[float]]]
    xlabel: str = "training step"
    yscale: str = "linear"  # or "log"


def write_panels(path: str | Path, panels: list[Panel], title: str = "") -> Path:
    """Line charts side by side in one PNG (the first line of each panel drawn bold)."""
    figure = _figure(5.0 * len(panels) + 1.0, 4.0)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for number, (label, (xs, ys)) in enumerate(panel.lines.items()):
            axes.plot(xs, ys, marker="o", markersize=3, linewidth=2.2 if number == 0 else 1.0, label=label)
        axes.set_title(panel.title, fontsize=9)
        axes.set_xlabel(panel.xlabel, fontsize=8)
        axes.set_ylabel(panel.ylabel, fontsize=8)
        axes.set_yscale(panel.yscale)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def write_heatmap(path: str | Path, values: list[list[float]], rows: list[str], columns: list[str],
                  marked: list[list[bool]] | None = None, title: str = "", colorbar: str = "",
                  xlabel: str = "") -> Path:
    """``values[column][row]`` as a rows x columns heatmap in [0, 1]; ``marked`` cells get a dot."""
    import numpy as np

    grid = np.asarray(values, dtype=float).T if values else np.zeros((len(rows), 0))
    width = min(24.0, 6.0 + 0.2 * grid.shape[1])
    height = min(40.0, 1.5 + 0.2 * max(1, len(rows)))
    figure = _figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if marked:
        rows_marked, columns_marked = np.nonzero(np.asarray(marked, dtype=bool).T)
        axes.scatter(columns_marked, rows_marked, s=12, c="red", marker="o")
    axes.set_yticks(range(len(rows)), rows, fontsize=6)
    step = max(1, len(columns) // 20)  # at most ~20 labels on the x axis
    axes.set_xticks(range(0, len(columns), step), columns[::step], fontsize=7, rotation=90)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label=colorbar)
    return _save(figure, path)
