"""Rewrites of the IR before ONNX is written, and the choice of each integer encoding.

- ``fold_batchnorm``: exact. LSQ quantizes the *unfolded* weight, so the integer codes must stay
  as trained; batch norm's per-channel factor goes into the per-channel weight scale (and the
  code's sign, when gamma is negative, so scales stay positive), its shift into the bias.
- ``sink_movement``: a quantizer after flatten/reshape/max-pool moves before it (quantization is
  monotone and elementwise, so both orders give the same numbers); the pooling or reshaping then
  runs on the 8-bit tensor and ``GlobalAveragePool -> QuantizeLinear`` stays adjacent for fusion.
- ``output_grid``: which 8-bit grid a conv/add output is written on. When every consumer is the
  same learned quantizer, its grid: exact. Otherwise (a residual add, a float layer, the
  model's output) the tensor is float in PyTorch and gets a calibrated 8-bit grid: the one
  place the export approximates, reported in ``Graph.notes``.
"""

from __future__ import annotations

import math

import numpy as np

from qtool.exporters.adapters import ExportError
from qtool.exporters.ir import CLAMPS, MOVEMENT, Graph, Grid, Op, Weights


def fold_batchnorm(graph: Graph) -> None:
    for bn in [op for op in graph.ops if op.kind == "batchnorm"]:
        producer = graph.producer(bn.inputs[0])
        if producer is None or producer.kind not in ("conv", "linear") or len(graph.consumers(producer.output)) != 1:
            continue  # stays a float Mul/Add
        _fold_into(producer, bn.attrs["mul"], bn.attrs["add"])
        graph.ops.remove(bn)
        producer.output = bn.output


def _fold_into(layer: Op, mul: np.ndarray, add: np.ndarray) -> None:
    bias = layer.attrs["bias"] if layer.attrs["bias"] is not None else np.zeros_like(mul)
    layer.attrs["bias"] = mul * bias + add
    weights: Weights | None = layer.attrs["weights"]
    if weights is None:
        layer.attrs["weight"] = layer.attrs["weight"] * mul.reshape((-1,) + (1,) * (layer.attrs["weight"].ndim - 1))
        return
    sign = np.where(mul < 0, -1, 1).reshape((-1,) + (1,) * (weights.codes.ndim - 1))
    codes = weights.codes * sign
    magnitude = np.abs(mul)
    dead = magnitude == 0  # gamma = 0: the channel is its bias; keep a valid positive scale
    codes[dead] = 0
    lo, hi = weights.lo, weights.hi
    if codes.min(initial=0) < lo or codes.max(initial=0) > hi:
        # A sign flip on an asymmetric grid ([-8, 7]): widen it symmetric, still exact.
        widest = max(-lo, hi)
        lo, hi = -widest, widest
        if widest > 127:
            raise ExportError(f"{layer.layer}: a negative batch-norm gamma flips the weight code -128 out of int8")
    layer.attrs["weights"] = Weights(codes.astype(np.int32), weights.scale * np.where(dead, 1.0, magnitude), lo, hi)


def sink_movement(graph: Graph) -> None:
    """quant(move(x)) -> move(quant(x)) while the moved tensor feeds only that quantizer."""
    changed = True
    while changed:
        changed = False
        for quant in [op for op in graph.ops if op.kind in ("quant", "sign")]:
            move = graph.producer(quant.inputs[0])
            if move is None or move.kind not in MOVEMENT or len(graph.consumers(move.output)) != 1:
                continue
            quantized = f"{move.inputs[0]}__{quant.layer}_q"
            moved_out = quant.output
            quant.inputs, quant.output = [move.inputs[0]], quantized
            move.inputs, move.output = [quantized], moved_out
            order = graph.ops
            order.remove(quant)
            order.insert(order.index(move), quant)
            changed = True


def clamp_chain_end(graph: Graph, tensor: str) -> str:
    """Follow relu/clip ops that are the only consumer of their input; return the last tensor."""
    while True:
        users = graph.consumers(tensor)
        if len(users) != 1 or users[0].kind not in CLAMPS:
            return tensor
        tensor = users[0].output


def output_grid(graph: Graph, tensor: str, share: bool = False) -> tuple[Grid, bool]:
    """(grid, exact) for the integer tensor that a conv/add writes as ``tensor``.

    ``share``: when a learned quantizer reads the tensor, reuse its step outright (as long as
    255 steps cover the calibrated range), so that quantizer needs no requantization at run
    time, only its Clip; other readers (the residual path) see that coarser step."""
    end = clamp_chain_end(graph, tensor)
    users = graph.consumers(end)
    grids = [op.attrs["grid"].as_uint8() for op in users if op.kind == "quant"]
    if users and len(grids) == len(users) and all(grid.same_encoding(grids[0]) for grid in grids):
        first = grids[0]
        low, high = first.container
        return Grid(first.scale, first.zero_point, low, high), True
    return calibrated_grid(graph, end, reference=grids[0] if grids else None, share=share), False


def calibrated_grid(graph: Graph, tensor: str, reference: Grid | None = None, share: bool = False) -> Grid:
    """uint8 grid covering the calibration range of ``tensor`` (zero included, so ReLU's zero
    and zero padding are exact). With a ``reference`` quantizer downstream, the step is the
    reference step divided by an odd integer: requantizing to the reference is then exact
    (an odd divisor never puts a code exactly halfway between two reference codes)."""
    if tensor not in graph.ranges:
        raise ExportError(f"no calibration range for {tensor}")
    low, high = graph.ranges[tensor]
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255
    if reference is not None and reference.scale >= scale:
        divisor = 1 if share else math.floor(reference.scale / scale)
        divisor -= 1 - divisor % 2
        scale = reference.scale / divisor
    zero_point = int(np.clip(np.round(-low / scale), 0, 255))
    return Grid(float(scale), zero_point, 0, 255)


def fuse_elementwise(graph: Graph) -> None:
    """An elementwise function followed by more of them (and ReLU/clip) becomes one op whose
    ``steps`` list the chain: one table from codes to codes when both ends are quantized."""
    for op in [op for op in graph.ops if op.kind == "elementwise"]:
        if op not in graph.ops:
            continue  # absorbed into an earlier chain
        steps = [(op.attrs["function"], op.attrs["scalar"])]
        while True:
            users = graph.consumers(op.output)
            if len(users) != 1 or users[0].kind not in ("elementwise", "relu", "clip") or users[0].inputs != [op.output]:
                break
            user = users[0]
            if user.kind == "elementwise":
                steps.append((user.attrs["function"], user.attrs["scalar"]))
            else:
                bounds = (0.0, None) if user.kind == "relu" else (user.attrs["lo"], user.attrs["hi"])
                steps.append(("clamp", bounds))
            graph.ops.remove(user)
            op.output = user.output
        op.attrs["steps"] = steps


def prepare_graph(graph: Graph) -> None:
    fold_batchnorm(graph)
    sink_movement(graph)
    fuse_elementwise(graph)
