"""The exporter's intermediate form: a flat list of small ops over named tensors.

Adapters (``adapters.py``, ``brevitas.py``) turn PyTorch layers into these ops; passes
(``passes.py``) fold batch norm and choose integer encodings; ``onnx_graph.py`` writes ONNX.
Quantization is explicit: a ``quant`` op is a fake quantizer (float in, float on a grid out),
and a quantized ``conv``/``linear`` carries integer weight codes and per-channel scales. That is
all the emitter needs to know about qtool's LSQ layers, Brevitas layers or binary layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Grid:
    """An activation quantizer: ``code = clamp(round(x / scale) + zero_point, lo, hi)``,
    ``value = (code - zero_point) * scale``. Codes live in an 8-bit container (uint8 when the
    grid has no negative code, int8 otherwise), so a 4-bit grid is [0, 15] inside uint8."""

    scale: float
    zero_point: int
    lo: int
    hi: int

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"quantizer scale must be positive, got {self.scale}")
        if not (-128 <= self.lo <= self.hi <= 255) or (self.lo < 0 and self.hi > 127):
            raise ValueError(f"grid [{self.lo}, {self.hi}] does not fit an 8-bit container")

    @property
    def dtype(self) -> str:
        return "uint8" if self.lo >= 0 else "int8"

    @property
    def container(self) -> tuple[int, int]:
        return (0, 255) if self.dtype == "uint8" else (-128, 127)

    def as_uint8(self) -> "Grid":
        """The same grid with codes shifted by 128 into uint8 (zero point 128 for a signed grid).

        The exporter writes every activation as uint8: onnxruntime's x86 CPU forms QLinearConv
        only from uint8 activations (it rewrites int8 ones to uint8 only for a Q directly
        followed by its DQ, not across the Clip a 2-7 bit grid needs) and only when a conv's
        input and output share one type."""
        if self.lo >= 0:
            return self
        return Grid(self.scale, self.zero_point + 128, self.lo + 128, self.hi + 128)

    def same_encoding(self, other: "Grid") -> bool:
        """Same scale, zero point and container: the integer codes mean the same values."""
        return (self.dtype == other.dtype and self.zero_point == other.zero_point
                and np.isclose(self.scale, other.scale, rtol=1e-6, atol=0))

    def code_of(self, value: float) -> int:
        """The code of a float bound (ReLU6's 6.0, ...), rounded like QuantizeLinear (half to even)."""
        return int(np.round(value / self.scale)) + self.zero_point

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        codes = np.clip(np.round(x / self.scale) + self.zero_point, self.lo, self.hi)
        return (codes - self.zero_point) * self.scale


@dataclass
class Weights:
    """Integer weight codes and a positive scale per output channel (axis 0)."""

    codes: np.ndarray  # int32, same shape as the float weight
    scale: np.ndarray  # float64, [out_channels]
    lo: int            # the weight grid, e.g. [-7, 7] at 4 bits narrow, [-1, 1] for binary
    hi: int

    def __post_init__(self):
        if np.any(self.scale <= 0):
            raise ValueError("weight scales must be positive")
        if self.codes.min(initial=0) < self.lo or self.codes.max(initial=0) > self.hi:
            raise ValueError(f"weight codes leave the grid [{self.lo}, {self.hi}]")

    @property
    def bits(self) -> int:
        """Bits of the signed two's complement type that holds every code."""
        widest = max(-self.lo, self.hi + 1, 1)
        return max(2, int(np.ceil(np.log2(widest))) + 1)

    def dequantized(self) -> np.ndarray:
        return self.codes * self.scale.reshape((-1,) + (1,) * (self.codes.ndim - 1))


@dataclass
class Op:
    kind: str            # see KINDS
    inputs: list[str]
    output: str
    layer: str           # the PyTorch name, for messages
    attrs: dict = field(default_factory=dict)


# conv/linear attrs: weights (Weights) or weight (float ndarray), bias (float64 ndarray or None),
#   and for conv stride/padding/dilation/groups.
# quant: grid. sign: scale (binary activation: +scale where x >= 0, -scale elsewhere).
# relu; clip: lo, hi (floats or None). batchnorm: mul, add (per channel). add. cat: axis.
# groupnorm: groups, eps, mul, add.
# maxpool/avgpool: kernel, stride, padding, ceil_mode (+ count_include_pad). global_avgpool.
# flatten; reshape: shape (without the batch dimension).
# mul: two tensors. elementwise: function (a name in adapters.ELEMENTWISE), scalar; after
#   fuse_elementwise, steps: the chain [(function, scalar)] up to the next quantizer.
# slice: starts, ends, axes, steps. transpose: perm.
KINDS = {"quant", "sign", "conv", "linear", "relu", "clip", "batchnorm", "groupnorm", "add", "mul", "cat", "maxpool",
         "avgpool", "global_avgpool", "flatten", "reshape", "elementwise", "slice", "transpose"}
MOVEMENT = {"flatten", "reshape", "maxpool", "slice", "transpose"}   # commute with an elementwise quantizer
CLAMPS = {"relu", "clip"}                      # become integer bounds on a quantized tensor


@dataclass
class Graph:
    ops: list[Op]
    input: str
    outputs: list[str]
    input_shape: tuple[int, ...]                 # without the batch dimension
    ranges: dict[str, tuple[float, float]]       # min and max of each tensor on the calibration data
    shapes: dict[str, tuple[int, ...]]           # of each tensor, without the batch dimension
    notes: list[str] = field(default_factory=list)  # approximations the export had to make

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]

    def producer(self, tensor: str) -> Op | None:
        return next((op for op in self.ops if op.output == tensor), None)

    def rename(self, old: str, new: str) -> None:
        for op in self.ops:
            op.inputs = [new if name == old else name for name in op.inputs]
        self.outputs = [new if name == old else name for name in self.outputs]
