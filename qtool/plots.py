"""PNG figures written next to report.json (GAQAT's per-layer heatmap, ...).

Uses matplotlib's object API with the Agg canvas directly, never pyplot: no global backend is
switched and no display is needed, so a training run on a headless machine (or inside a user's
notebook) is not affected.
"""

from __future__ import annotations

from pathlib import Path

from qtool.checkpoint import atomic_path


def write_heatmap(path: str | Path, values: list[list[float]], rows: list[str], columns: list[str],
                  marked: list[list[bool]] | None = None, title: str = "", colorbar: str = "",
                  xlabel: str = "") -> Path:
    """``values[column][row]`` as a rows x columns heatmap in [0, 1]; ``marked`` cells get a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np

    grid = np.asarray(values, dtype=float).T if values else np.zeros((len(rows), 0))
    width = min(24.0, 6.0 + 0.2 * grid.shape[1])
    height = min(40.0, 1.5 + 0.2 * max(1, len(rows)))
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
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
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
