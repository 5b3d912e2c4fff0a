"""``qtool bench``: latency, size and the kernels onnxruntime actually ran, side by side.

Torch-free: it needs onnxruntime, numpy and rich only, so it runs on the edge device itself
(``pip install qtool``, no extras). Every model gets its own CPU session with explicit threads
(``qtool.onnxrt``), a warm-up, then timed runs interleaved across models (model A, model B,
model A, ...) so that a noisy neighbour slows every model alike and the ratios stay honest.
The first model is the reference of the ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError
from qtool.onnxrt import create_session, float_layers, integer_layers, optimized_census, random_feed
from qtool.timing import interleaved_ms


@dataclass
class BenchConfig:
    threads: int = 1
    runs: int = 200
    warmup: int = 20
    batch: int = 1


def _check(paths: list[str], config: BenchConfig) -> None:
    if not paths:
        raise QtoolError("no model to bench: pass MODEL.onnx")
    if config.runs < 1 or config.warmup < 0 or config.batch < 1:
        raise QtoolError("--runs and --batch must be at least 1 and --warmup at least 0")
    for path in paths:
        if not Path(path).is_file():
            raise QtoolError(f"ONNX model not found: {path}" if not Path(path).exists() else f"{path} is not a file")


def bench_models(paths: list[str], config: BenchConfig = BenchConfig()) -> dict:
    """The ``bench --json`` document: ``{"models": [...]}`` in the contract's schema, plus the
    ratios to the first model and the settings used."""
    import onnxruntime as ort

    _check(paths, config)
    sessions = [create_session(path, config.threads) for path in paths]
    feeds = [random_feed(session, config.batch) for session in sessions]
    runs = {index: (lambda s=session, f=feed: s.run(None, f)) for index, (session, feed) in enumerate(zip(sessions, feeds))}
    times = list(interleaved_ms(runs, config.runs, config.warmup).values())

    models = []
    for path, samples in zip(paths, times):
        census = optimized_census(path, config.threads)
        models.append({
            "path": str(path),
            "bytes": Path(path).stat().st_size,
            "latency_ms": {"median": float(np.median(samples)), "p90": float(np.percentile(samples, 90))},
            "threads": config.threads,
            "ops": census,
        })
    first = models[0]
    for model in models:
        model["vs_first"] = {
            "latency": model["latency_ms"]["median"] / first["latency_ms"]["median"],
            "bytes": model["bytes"] / first["bytes"],
        }
    return {"models": models, "runs": config.runs, "warmup": config.warmup, "batch": config.batch,
            "onnxruntime": ort.__version__}


def print_bench(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"onnxruntime {result['onnxruntime']} CPU, batch {result['batch']}, "
                        f"{result['models'][0]['threads']} thread(s), {result['runs']} interleaved runs")
    for column in ("model", "KiB", "median ms", "p90 ms", "× latency", "× size"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in result["models"]:
        table.add_row(model["path"], f"{model['bytes'] / 1024:.1f}", f"{model['latency_ms']['median']:.3f}",
                      f"{model['latency_ms']['p90']:.3f}", f"{model['vs_first']['latency']:.2f}",
                      f"{model['vs_first']['bytes']:.3f}")
    console.print(table)
    for model in result["models"]:  # what onnxruntime ran, after its graph optimizations
        console.print(f"{model['path']}: integer {_ops_text(integer_layers(model['ops']))}; "
                      f"float compute {_ops_text(float_layers(model['ops']))}", soft_wrap=True)


def _ops_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{op}×{count}" for op, count in sorted(ops.items(), key=lambda item: -item[1])) or "none"
