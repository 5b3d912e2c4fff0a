"""Interleaved wall-clock timing, torch-free: the one loop every qtool benchmark uses.

Each round runs every function once, in turn (A, B, C, A, B, C, ...), so a noisy neighbour
or a frequency change slows all sides alike and the ratios between them stay honest.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_ms(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Milliseconds of each call, per function: ``warmup`` untimed rounds, then ``repeats`` timed."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}
