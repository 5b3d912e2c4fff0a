"""IR -> ONNX in the QDQ form onnxruntime fuses into integer kernels.

Every quantized conv/linear is written as

    DequantizeLinear(x codes) ─┐
    DequantizeLinear(w int8) ──┼─ Conv / Gemm ─ QuantizeLinear(next layer's grid)
    DequantizeLinear(b int32) ─┘

which onnxruntime turns into QLinearConv / QGemm. Activation codes of a 2-7 bit grid live in an
8-bit container and an integer ``Clip`` keeps them on the grid ([0, 15] at 4 bits), so the
numbers are the trained model's; ReLU/ReLU6 before a quantizer become that Clip's bounds.
Residual adds take DQ inputs and a Q output (QLinearAdd). Weights are int8 initializers holding
the N-bit codes, or INT4 initializers (opset 21) behind a ``Cast`` to int8 that onnxruntime
constant-folds when it loads the model: the file is half the size and the kernels are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qtool.exporters.adapters import ELEMENTWISE, ExportError
from qtool.exporters.bounds import fits_pair_sums
from qtool.exporters.ir import Graph, Grid, Op, Weights
from qtool.exporters.passes import calibrated_grid, clamp_chain_end, output_grid

_ONNX_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
INT32 = np.iinfo(np.int32)


@dataclass
class IntValue:
    """An integer ONNX tensor standing for an IR tensor: ``value = (code - zp) * scale``.
    ``lo..hi`` are the codes it must be clamped to; ``known`` what the ONNX tensor guarantees.
    Clamps are applied lazily, after pooling and reshapes, where the tensor is smallest."""

    name: str
    grid: Grid
    lo: int
    hi: int
    known: tuple[int, int]

    @property
    def needs_clip(self) -> bool:
        return self.lo > self.known[0] or self.hi < self.known[1]

    def bounded(self, lo: int, hi: int) -> "IntValue":
        return IntValue(self.name, self.grid, max(self.lo, lo), min(self.hi, hi), self.known)


def widening(weights: Weights, input_grid: Grid) -> np.ndarray:
    """Per output channel, the largest integer m such that m * code still fits int8 and cannot
    saturate x86's 16-bit u8*s8 pair sums (AVX2 without VNNI): 2 * m|code| * max input code
    <= 32767.

    Storing m * code with scale / m is the same weight, but the int32 accumulator then counts in
    steps m times finer (up to 18x at 4 bits), so rounding the float bias (batch norm's shift)
    to accumulator units costs m times less. Without it, rounding the bias alone flips about
    1% of the next 4-bit layer's codes against PyTorch."""
    limit = min(127, 16383 // max(1, input_grid.hi))
    widest = np.abs(weights.codes).reshape(len(weights.scale), -1).max(axis=1)
    return np.maximum(1, limit // np.maximum(widest, 1)).astype(np.int64)


def lookup_table(source: IntValue, steps: list[tuple], quant: Op) -> tuple[np.ndarray, Grid]:
    """The output code for each of the 256 input codes: the float32 value PyTorch's fake
    quantizer gives that code, the chain of torch functions, then the output quantizer's own
    arithmetic (``round(clamp(y / step))``), so the table is the trained model's function."""
    values = (torch.arange(256, dtype=torch.float32) - source.grid.zero_point) * torch.tensor(source.grid.scale, dtype=torch.float32)
    for function, scalar in steps:
        values = ELEMENTWISE[function](values, scalar)
    grid = quant.attrs["grid"].as_uint8()
    if "lsq" in quant.attrs:
        step, qmin, qmax = quant.attrs["lsq"]
        levels = torch.clamp(values / step, qmin, qmax).round() * (1 if float(step) > 0 else -1)
        codes = levels.numpy().astype(np.int64) + grid.zero_point
    else:
        codes = np.round(values.numpy().astype(np.float64) / grid.scale) + grid.zero_point
    return np.clip(codes, grid.lo, grid.hi).astype(np.uint8), grid


class OnnxBuilder:
    def __init__(self, graph: Graph, weight_storage: str = "int8", opset: int = 17, numerics: str = "fast"):
        self.graph = graph
        self.numerics = numerics
        self.weight_storage = weight_storage
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.ints: dict[str, IntValue] = {}
        self.floats: dict[str, str] = {}
        self._constants: dict[tuple, str] = {}
        self._clips: dict[tuple, str] = {}
        self.approximate: set[str] = set()  # IR tensors whose codes approximate a float PyTorch tensor
        self._widened: dict[tuple, str] = {}
        self._names: set[str] = set()

    # -- names, constants, nodes --------------------------------------------------------------
    def fresh(self, hint: str, readable: bool = False) -> str:
        """A unique tensor name. Only layer outputs keep their PyTorch-derived name; the Q/DQ/Clip
        plumbing gets short ones (``t17``), because names repeated over a few hundred nodes
        are several percent of a small model's file."""
        if not readable:
            hint = "t"
        name, index = hint, 1
        while name in self._names:
            name, index = f"{hint}{index}" if not readable else f"{hint}_{index}", index + 1
        self._names.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, readable: bool = False, **attrs) -> str:
        output = self.fresh(hint, readable)
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))  # unnamed: the output names it
        return output

    def constant(self, array: np.ndarray, hint: str) -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars 0-d
            self._constants[key] = name
        return self._constants[key]

    def grid_constants(self, grid: Grid) -> tuple[str, str]:
        scale = self.constant(np.array(grid.scale, np.float32), "scale")
        zero_point = self.constant(np.array(grid.zero_point, grid.dtype), f"zero_point_{grid.dtype}")
        return scale, zero_point

    # -- integer and float views of an IR tensor ----------------------------------------------
    def quantize(self, float_name: str, grid: Grid, hint: str) -> IntValue:
        scale, zero_point = self.grid_constants(grid)
        name = self.node("QuantizeLinear", [float_name, scale, zero_point], f"{hint}_q")
        return IntValue(name, grid, grid.lo, grid.hi, grid.container)

    def materialize(self, tensor: str) -> IntValue:
        """The integer tensor with its clamp applied."""
        value = self.ints[tensor]
        if value.needs_clip:
            key = (value.name, value.lo, value.hi)  # two quantizers reading one tensor share its Clip
            if key not in self._clips:
                dtype = value.grid.dtype
                lo = self.constant(np.array(value.lo, dtype), f"clip_lo_{dtype}")
                hi = self.constant(np.array(value.hi, dtype), f"clip_hi_{dtype}")
                self._clips[key] = self.node("Clip", [value.name, lo, hi], f"{tensor}_clip")
            value = IntValue(self._clips[key], value.grid, value.lo, value.hi, (value.lo, value.hi))
            self.ints[tensor] = value
        return value

    def dequantized(self, tensor: str) -> str:
        """A DequantizeLinear of ``tensor`` for one consumer. Never shared: onnxruntime fuses a DQ
        into a kernel only when the DQ feeds that kernel alone."""
        value = self.materialize(tensor)
        scale, zero_point = self.grid_constants(value.grid)
        return self.node("DequantizeLinear", [value.name, scale, zero_point], f"{tensor}_dq")

    def float_of(self, tensor: str) -> str:
        return self.floats[tensor] if tensor in self.floats else self.dequantized(tensor)

    def int_of(self, tensor: str, grid: Grid | None = None) -> IntValue:
        """``tensor`` as integer codes, on ``grid`` when given (requantizing if needed)."""
        value = self.ints.get(tensor)
        if value is not None and (grid is None or value.grid.same_encoding(grid)):
            return value
        if grid is None:
            grid = calibrated_grid(self.graph, tensor)
            self.approximated(tensor, "float in PyTorch, quantized to 8 bits (calibrated) for an integer kernel")
        value = self.quantize(self.float_of(tensor), grid, tensor)
        self.ints[tensor] = value
        return value

    def approximated(self, tensor: str, why: str) -> None:
        """Record that ``tensor``'s integer codes only approximate PyTorch's float values."""
        self.approximate.add(tensor)
        self.graph.notes.append(f"{tensor}: {why}")

    # -- weights ------------------------------------------------------------------------------
    def weight(self, op: Op, weights: Weights, multiplier: np.ndarray) -> str:
        """DQ(codes * multiplier, scale / multiplier): the trained weight values (see ``widening``)."""
        shape = (-1,) + (1,) * (weights.codes.ndim - 1)
        if self.weight_storage == "int4" and weights.bits <= 4:
            packed = self.int4_initializer(op, weights.codes)
            # Cast and Mul of constants: onnxruntime folds them into an int8 initializer at load.
            stored = self.node("Mul", [self.node("Cast", [packed], f"{op.output}_w_int8", to=TensorProto.INT8),
                                       self.constant(multiplier.astype(np.int8).reshape(shape), f"{op.output}_w_mul")],
                               f"{op.output}_w_widened")
        else:
            stored = self.constant((weights.codes * multiplier.reshape(shape)).astype(np.int8), f"{op.output}_w")
        scale = self.constant((weights.scale / multiplier).astype(np.float32), f"{op.output}_w_scale")
        # An explicit zero point: onnxruntime's Gemm -> QGemm fusion does not fire without one.
        zero_point = self.constant(np.zeros(len(weights.scale), np.int8), "w_zero_point")
        return self.node("DequantizeLinear", [stored, scale, zero_point], f"{op.output}_w_dq", axis=0)

    def int4_initializer(self, op: Op, codes: np.ndarray) -> str:
        """An INT4 tensor in raw_data, two codes per byte, the first in the low nibble (ONNX's layout)."""
        nibbles = (codes.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        name = self.fresh(f"{op.output}_w_int4")
        self.initializers.append(helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True))
        return name

    def bias(self, op: Op, input_grid: Grid, weight_scale: np.ndarray) -> str | None:
        """The int32 bias input of QLinearConv/QGemm, in units of input step x weight step
        (float32, as onnxruntime requires): the trained model's own codes when it rounded its
        bias so (a graph-prepared layer), else rounded here."""
        if op.attrs["bias"] is None:
            return None
        codes, step = op.attrs.get("bias_codes"), op.attrs.get("bias_unit")
        if codes is None:
            step = np.float32(input_grid.scale) * weight_scale.astype(np.float32)
            codes = np.clip(np.round(op.attrs["bias"] / step.astype(np.float64)), INT32.min, INT32.max).astype(np.int32)
        scale = self.constant(step.astype(np.float32), f"{op.output}_b_scale")
        return self.node("DequantizeLinear", [self.constant(codes, f"{op.output}_b"), scale], f"{op.output}_b_dq", axis=0)

    # -- ops ----------------------------------------------------------------------------------
    def emit(self, op: Op) -> None:
        handler = getattr(self, f"_{op.kind}", None)
        if handler is None:
            raise ExportError(f"{op.layer}: no ONNX form for IR op {op.kind!r}")
        handler(op)

    def _quant(self, op: Op) -> None:
        grid: Grid = op.attrs["grid"].as_uint8()
        source = self.ints.get(op.inputs[0])
        if source is not None and source.grid.same_encoding(grid):
            self.ints[op.output] = IntValue(source.name, grid, source.lo, source.hi, source.known).bounded(grid.lo, grid.hi)
        else:
            self.ints[op.output] = self.quantize(self.float_of(op.inputs[0]), grid, op.output)

    def _sign(self, op: Op) -> None:
        x = self.float_of(op.inputs[0])
        zero = self.constant(np.array(0.0, np.float32), "zero_f32")
        positive = self.node("GreaterOrEqual", [x, zero], f"{op.output}_nonneg")
        grid = Grid(op.attrs["scale"], 0, -1, 1).as_uint8()  # codes 127 and 129: -1 and +1 around 128
        codes = self.node("Where", [positive, self.constant(np.array(grid.hi, np.uint8), "plus_one_u8"),
                                    self.constant(np.array(grid.lo, np.uint8), "minus_one_u8")], f"{op.output}_sign")
        self.ints[op.output] = IntValue(codes, grid, grid.lo, grid.hi, (grid.lo, grid.hi))

    def _weighted(self, op: Op) -> None:
        weights: Weights | None = op.attrs["weights"]
        if weights is None:
            return self._float_weighted(op)
        x = self.int_of(op.inputs[0])  # a weight-only quantized layer gets a calibrated input grid
        grid, exact = output_grid(self.graph, op.output, share=self.numerics == "fast")
        # The kernel's int32 bias is the trained one: the layer rounded it so, or has none.
        trained_bias = op.attrs.get("bias_codes") is not None or op.attrs["bias"] is None
        if not fits_pair_sums(self.materialize(op.inputs[0]).hi, np.abs(weights.codes).max(initial=0)):
            # u8 x s8 would saturate without VNNI (see bounds.py): u8 x u8 integer kernels
            return self._integer_layer(op, x, weights, grid if exact else None)
        if self.numerics == "faithful" and (not trained_bias or (not exact and op.kind == "conv")):
            # PyTorch adds this float bias (batch norm's shift) to a float sum and rounds once, at
            # the next quantizer: so does the graph. An int32 bias inside QLinearConv would be
            # rounded to accumulator units first, which flips codes at rounding boundaries. (And
            # a conv output that is float in PyTorch stays float.)
            return self._integer_layer(op, x, weights, None)
        if not exact and op.kind == "linear":
            grid = None  # QGemm with a float output
        codes, grid_in = self.kernel_input(op.inputs[0], widen=not trained_bias)
        multiplier = np.ones(len(weights.scale), np.int64) if trained_bias else widening(weights, grid_in)
        inputs = [self.node("DequantizeLinear", [codes, *self.grid_constants(grid_in)], f"{op.inputs[0]}_dq"),
                  self.weight(op, weights, multiplier)]
        bias = self.bias(op, grid_in, weights.scale / multiplier)
        if bias is not None:
            inputs.append(bias)
            if not trained_bias:  # fast numerics: a float bias (batch norm's shift) the model never rounded
                self.graph.notes.append(f"{op.output}: float bias of {op.layer} rounded to int32 accumulator "
                                        "units (a code at a rounding boundary can flip)")
        y = self._compute(op, inputs)
        if grid is None:
            self.floats[op.output] = y  # QGemm with a float output: the logits stay exact
            return
        self.ints[op.output] = self.quantize(y, grid, op.output)
        if not exact:
            self.approximated(op.output, f"output of {op.layer}, float in PyTorch, written on a calibrated 8-bit "
                                         f"grid (step {grid.scale:.4g}) so that it runs as QLinearConv")

    _conv = _linear = _weighted

    def kernel_input(self, tensor: str, widen: bool = True) -> tuple[str, Grid]:
        """The codes an integer kernel reads, and their grid. In faithful numerics an unsigned
        2-7 bit grid feeding a layer with a float bias is widened: codes times n (17 at 4 bits)
        on a step n times smaller, the same values, so the int32 bias of the next kernel is
        rounded to a unit n times finer."""
        value = self.materialize(tensor)
        factor = 255 // max(value.hi, 1)
        if not widen or self.numerics != "faithful" or value.grid.zero_point != 0 or value.lo < 0 or factor < 2:
            return value.name, value.grid
        key = (value.name, factor)
        if key not in self._widened:
            self._widened[key] = self.node("Mul", [value.name, self.constant(np.array(factor, np.uint8), f"times_{factor}")],
                                           f"{tensor}_widened")
        grid = value.grid
        return self._widened[key], Grid(grid.scale / factor, 0, 0, 255)

    def _integer_layer(self, op: Op, x: IntValue, weights: Weights, grid: Grid | None) -> None:
        """ConvInteger/MatMulInteger with uint8 weights (code + 128, zero point 128): exact int32
        sums on every CPU (onnxruntime's u8 x u8 path widens before multiplying, and its
        ConvInteger is several times slower with int8 weights), then the float step and bias.
        The output is float (into a float residual sum, the logits) or quantized to ``grid``."""
        a = op.attrs
        conv = op.kind == "conv"
        if self.weight_storage == "int4" and weights.bits <= 4:
            packed = self.int4_initializer(op, weights.codes)
            wide = self.node("Cast", [packed], f"{op.output}_w_int32", to=TensorProto.INT32)
            shifted = self.node("Add", [wide, self.constant(np.array(128, np.int32), "offset_128_i32")], f"{op.output}_w_shift")
            codes = self.node("Cast", [shifted], f"{op.output}_w_u8", to=TensorProto.UINT8)
            if not conv:
                codes = self.node("Transpose", [codes], f"{op.output}_w_t", perm=[1, 0])
        else:
            stored = weights.codes + 128 if conv else (weights.codes + 128).T
            codes = self.constant(np.ascontiguousarray(stored).astype(np.uint8), f"{op.output}_w_u8")
        value = self.materialize(op.inputs[0])
        zero_points = [self.constant(np.array(value.grid.zero_point, np.uint8), "zero_point_uint8"),
                       self.constant(np.array(128, np.uint8), "w_zero_point_u8")]
        if conv:
            accumulator = self.node("ConvInteger", [value.name, codes, *zero_points], f"{op.output}_acc",
                                    strides=list(a["stride"]), pads=list(a["padding"]) * 2,
                                    dilations=list(a["dilation"]), group=a["groups"])
        else:
            self._check_linear_input(op)
            accumulator = self.node("MatMulInteger", [value.name, codes, *zero_points], f"{op.output}_acc")
        shape = (1, -1, 1, 1) if conv else (1, -1)
        bias_codes = a.get("bias_codes")
        if bias_codes is not None:  # the trained int32 bias, added to the int32 sums
            accumulator = self.node("Add", [accumulator, self.constant(bias_codes.astype(np.int32).reshape(shape), f"{op.output}_b")],
                                    f"{op.output}_acc_b")
            step = a["bias_unit"].astype(np.float32).reshape(shape)
        else:
            step = (np.float32(x.grid.scale) * weights.scale.astype(np.float32)).reshape(shape)
        y = self.node("Mul", [self.node("Cast", [accumulator], f"{op.output}_acc_f32", to=TensorProto.FLOAT),
                              self.constant(step, f"{op.output}_step")], f"{op.output}_scaled")
        if a["bias"] is not None and bias_codes is None:
            y = self.node("Add", [y, self.constant(a["bias"].astype(np.float32).reshape(shape), f"{op.output}_b")], op.output)
        if grid is None:
            self.floats[op.output] = y
        else:
            self.ints[op.output] = self.quantize(y, grid, op.output)

    def _check_linear_input(self, op: Op) -> None:
        if len(self.graph.shapes.get(op.inputs[0], (0,))) != 1:
            raise ExportError(f"{op.layer}: Linear on a {len(self.graph.shapes[op.inputs[0]]) + 1}-D input "
                              "cannot be exported; flatten to (batch, features) first")

    def _float_weighted(self, op: Op) -> None:
        weight = self.constant(op.attrs["weight"].astype(np.float32), f"{op.output}_w")
        inputs = [self.float_of(op.inputs[0]), weight]
        if op.attrs["bias"] is not None:
            inputs.append(self.constant(op.attrs["bias"].astype(np.float32), f"{op.output}_b"))
        self.floats[op.output] = self._compute(op, inputs)

    def _compute(self, op: Op, inputs: list[str]) -> str:
        if op.kind == "linear":
            self._check_linear_input(op)
            return self.node("Gemm", inputs, op.output, readable=True, transB=1)
        pads = list(op.attrs["padding"]) * 2
        return self.node("Conv", inputs, op.output, readable=True, strides=list(op.attrs["stride"]), pads=pads,
                         dilations=list(op.attrs["dilation"]), group=op.attrs["groups"])

    def _clamp_codes(self, op: Op, lo: float | None, hi: float | None) -> None:
        source = self.ints[op.inputs[0]]
        grid = source.grid
        low = grid.container[0] if lo is None else max(grid.container[0], grid.code_of(lo))
        high = grid.container[1] if hi is None else min(grid.container[1], grid.code_of(hi))
        self.ints[op.output] = source.bounded(low, high)

    def _relu(self, op: Op) -> None:
        if op.inputs[0] in self.ints:
            return self._clamp_codes(op, 0.0, None)
        self.floats[op.output] = self.node("Relu", [self.float_of(op.inputs[0])], op.output)

    def _clip(self, op: Op) -> None:
        lo, hi = op.attrs["lo"], op.attrs["hi"]
        if op.inputs[0] in self.ints:
            return self._clamp_codes(op, lo, hi)
        bounds = ["" if v is None else self.constant(np.array(v, np.float32), "clip_f32") for v in (lo, hi)]
        while bounds and bounds[-1] == "":
            bounds.pop()
        self.floats[op.output] = self.node("Clip", [self.float_of(op.inputs[0])] + bounds, op.output)

    def _add(self, op: Op) -> None:
        """QLinearAdd when the sum is on a grid anyway (both operands and the result quantized in
        the model, e.g. Brevitas' QuantIdentity at the join), or in fast numerics; in faithful
        numerics otherwise a float Add, as in PyTorch."""
        grid, exact = output_grid(self.graph, op.output, share=self.numerics == "fast")
        on_grids = exact and all(name in self.ints and name not in self.approximate for name in op.inputs)
        if not on_grids and (self.numerics == "faithful" or not any(name in self.ints for name in op.inputs)):
            self.floats[op.output] = self.node("Add", [self.float_of(name) for name in op.inputs], op.output)
            return
        for name in op.inputs:
            self.int_of(name)  # a float operand gets a calibrated uint8 grid; every grid is uint8
        total = self.node("Add", [self.dequantized(name) for name in op.inputs], op.output)
        self.ints[op.output] = self.quantize(total, grid, op.output)
        if not on_grids:
            self.approximated(op.output, "residual sum, float in PyTorch, computed on 8-bit operands and result "
                                         "(QLinearAdd)")

    def _mul(self, op: Op) -> None:
        """QLinearMul (squeeze-excitation's x * gate) when the product is quantized in the model
        and both factors are codes; a float Mul otherwise."""
        grid, exact = output_grid(self.graph, op.output)
        if not (exact and all(name in self.ints for name in op.inputs)):
            self.floats[op.output] = self.node("Mul", [self.float_of(name) for name in op.inputs], op.output)
            return
        product = self.node("Mul", [self.dequantized(name) for name in op.inputs], op.output)
        self.ints[op.output] = self.quantize(product, grid, op.output)

    def _elementwise(self, op: Op) -> None:
        """Codes in, codes out: a 256-entry table built by running the model's own torch
        functions and output quantizer on every input code (exact by construction; Gather).
        Otherwise a float island with the ONNX operators of each step."""
        steps = op.attrs.get("steps") or [(op.attrs["function"], op.attrs["scalar"])]
        end = clamp_chain_end(self.graph, op.output)
        readers = self.graph.consumers(end)
        quants = [reader for reader in readers if reader.kind == "quant"]
        if op.inputs[0] in self.ints and readers and len(quants) == len(readers) and all(
                q.attrs["grid"].as_uint8().same_encoding(quants[0].attrs["grid"].as_uint8()) for q in quants):
            source = self.materialize(op.inputs[0])
            table, grid = lookup_table(source, steps, quants[0])
            indices = self.node("Cast", [source.name], f"{op.output}_index", to=TensorProto.INT32)
            codes = self.node("Gather", [self.constant(table, f"{op.output}_table"), indices], f"{op.output}_codes")
            self.ints[op.output] = IntValue(codes, grid, grid.lo, grid.hi, (int(table.min()), int(table.max())))
            return
        x = self.float_of(op.inputs[0])
        for index, (function, scalar) in enumerate(steps):
            x = self._float_step(function, scalar, x, op.output if index == len(steps) - 1 else f"{op.output}_{index}")
        self.floats[op.output] = x

    def _float_step(self, function: str, scalar, x: str, hint: str) -> str:
        readable = True
        if function in ("sigmoid", "tanh"):
            return self.node(function.capitalize(), [x], hint, readable)
        if function == "hardsigmoid":
            return self.node("HardSigmoid", [x], hint, readable, alpha=1 / 6, beta=0.5)
        if function == "hardswish":
            return self.node("HardSwish", [x], hint, readable)
        if function == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{hint}_sigmoid")], hint, readable)
        if function == "gelu":  # x * (1 + erf(x / sqrt 2)) / 2
            scaled = self.node("Mul", [x, self.constant(np.array(2 ** -0.5, np.float32), "inv_sqrt2")], f"{hint}_s")
            erf = self.node("Add", [self.node("Erf", [scaled], f"{hint}_erf"), self.constant(np.array(1.0, np.float32), "one_f32")], f"{hint}_e")
            return self.node("Mul", [self.node("Mul", [x, erf], f"{hint}_m"), self.constant(np.array(0.5, np.float32), "half_f32")], hint, readable)
        if function == "clamp":
            bounds = ["" if v is None else self.constant(np.array(v, np.float32), "clip_f32") for v in scalar]
            while bounds and bounds[-1] == "":
                bounds.pop()
            return self.node("Clip", [x] + bounds, hint, readable)
        constant = self.constant(np.array(scalar, np.float32), "scalar_f32")
        if function == "rsub":
            return self.node("Sub", [constant, x], hint, readable)
        return self.node(function.capitalize(), [x, constant], hint, readable)

    def _slice(self, op: Op) -> None:
        self._movement(op, "Slice")

    def _transpose(self, op: Op) -> None:
        self._movement(op, "Transpose", perm=list(op.attrs["perm"]))

    def _movement(self, op: Op, op_type: str, **attrs) -> None:
        """An op that moves values without computing (reshape, slice, pooling by max): on codes
        when the input is codes, its pending clamp carried along to where the tensor is smaller."""
        extra = self._extra_inputs(op)
        if op.inputs[0] in self.ints:
            source = self.ints[op.inputs[0]]
            name = self.node(op_type, [source.name] + extra, op.output, **attrs)
            self.ints[op.output] = IntValue(name, source.grid, source.lo, source.hi, source.known)
        else:
            self.floats[op.output] = self.node(op_type, [self.float_of(op.inputs[0])] + extra, op.output, **attrs)

    def _extra_inputs(self, op: Op) -> list[str]:
        if op.kind == "reshape":
            return [self.constant(np.array((-1,) + tuple(op.attrs["shape"]), np.int64), "shape")]
        if op.kind == "slice":
            return [self.constant(np.array(op.attrs[key], np.int64), f"slice_{key}") for key in ("starts", "ends", "axes", "steps")]
        return []

    def _maxpool(self, op: Op) -> None:
        a = op.attrs
        self._movement(op, "MaxPool", kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                       pads=list(a["padding"]) * 2, ceil_mode=int(a["ceil_mode"]))

    def _flatten(self, op: Op) -> None:
        self._movement(op, "Flatten", axis=1)

    def _reshape(self, op: Op) -> None:
        self._movement(op, "Reshape")

    def _avgpool(self, op: Op) -> None:
        a = op.attrs
        self.floats[op.output] = self.node(
            "AveragePool", [self.float_of(op.inputs[0])], op.output, kernel_shape=list(a["kernel"]),
            strides=list(a["stride"]), pads=list(a["padding"]) * 2, ceil_mode=int(a["ceil_mode"]),
            count_include_pad=int(a["count_include_pad"]))

    def _global_avgpool(self, op: Op) -> None:
        self.floats[op.output] = self.node("GlobalAveragePool", [self.float_of(op.inputs[0])], op.output)

    def _cat(self, op: Op) -> None:
        """Codes on one grid (the inputs share a quantizer in a graph-prepared model): Concat
        joins them as they are. Otherwise DQ -> Concat, quantized by whoever reads it."""
        values = [self.ints.get(name) for name in op.inputs]
        if all(values) and all(v.grid.same_encoding(values[0].grid) for v in values):
            codes = [self.materialize(name) for name in op.inputs]
            joined = self.node("Concat", [v.name for v in codes], op.output, axis=op.attrs["axis"])
            low, high = min(v.lo for v in codes), max(v.hi for v in codes)
            self.ints[op.output] = IntValue(joined, codes[0].grid, low, high, (low, high))
            return
        self.floats[op.output] = self.node("Concat", [self.float_of(name) for name in op.inputs], op.output,
                                           axis=op.attrs["axis"])

    def _affine(self, op: Op, x: str) -> str:
        """x * mul + add with one factor per channel (axis 1)."""
        rank = len(self.graph.shapes[op.inputs[0]])
        shape = (-1,) + (1,) * (rank - 1)
        mul = self.constant(op.attrs["mul"].astype(np.float32).reshape(shape), f"{op.output}_mul")
        add = self.constant(op.attrs["add"].astype(np.float32).reshape(shape), f"{op.output}_add")
        return self.node("Add", [self.node("Mul", [x, mul], f"{op.output}_scaled"), add], op.output)

    def _batchnorm(self, op: Op) -> None:
        self.floats[op.output] = self._affine(op, self.float_of(op.inputs[0]))

    def _groupnorm(self, op: Op) -> None:
        """(N, G, C/G * H * W) -> InstanceNormalization over the last axis -> back -> affine."""
        groups = op.attrs["groups"]
        grouped = self.node("Reshape", [self.float_of(op.inputs[0]),
                                        self.constant(np.array([0, groups, -1], np.int64), "group_shape")],
                            f"{op.output}_grouped")
        ones = self.constant(np.ones(groups, np.float32), f"ones_{groups}")
        zeros = self.constant(np.zeros(groups, np.float32), f"zeros_{groups}")
        normed = self.node("InstanceNormalization", [grouped, ones, zeros], f"{op.output}_normed",
                           epsilon=float(op.attrs["eps"]))
        shape = self.constant(np.array((0,) + tuple(self.graph.shapes[op.inputs[0]]), np.int64), f"{op.output}_shape")
        restored = self.node("Reshape", [normed, shape], f"{op.output}_restored")
        self.floats[op.output] = self._affine(op, restored)

    # -- the model ----------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        graph = self.graph
        self.floats[graph.input] = "input"
        self._names.add("input")
        for op in graph.ops:
            self.emit(op)
        names = ["logits"] if len(graph.outputs) == 1 else [f"output_{i}" for i in range(len(graph.outputs))]
        for tensor, name in zip(graph.outputs, names):
            self.nodes.append(helper.make_node("Identity", [self.float_of(tensor)], [name]))
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *graph.input_shape])]
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *graph.shapes[tensor]])
                   for tensor, name in zip(graph.outputs, names)]
        onnx_graph = helper.make_graph(self.nodes, "qtool", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="qtool",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        return model
