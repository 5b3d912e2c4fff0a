"""The saturation bound of x86's u8 x s8 integer kernels without VNNI, checked on the ONNX graph.

On AVX2 (and AVX-512 without VNNI) onnxruntime's MLAS multiplies uint8 activations by int8
weights with ``vpmaddubsw``, which adds each *pair* of adjacent products in int16 with
saturation: ``x0*w0 + x1*w1`` must stay within 32767, or the result is silently wrong (on a
VNNI CPU the same graph is exact, so a test on a VNNI machine would never see it). The exporter
keeps every u8 x s8 kernel within ``2 * max(x) * max|w| <= 32767``: weights of at most 7 bits
(``qtool.quant.graph.edge_weight_bits``), and uint8 x uint8 ``ConvInteger``/``MatMulInteger``
(widened to int16 before multiplying) for any layer that would exceed it.

``saturating_kernels`` reads the bound off the written graph itself, so it holds whatever CPU
runs the check.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

PAIR_LIMIT = 32767


def fits_pair_sums(max_input_code: int, max_abs_weight: int) -> bool:
    """Whether any two adjacent u8 x s8 products sum inside int16."""
    return 2 * int(max_input_code) * int(max_abs_weight) <= PAIR_LIMIT


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a Cast/Mul of initializers."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Cast":
            value = self.constant(node.input[0])
            return None if value is None else value.astype(np.int64)
        if node.op_type == "Mul":
            a, b = (self.constant(i) for i in node.input)
            return None if a is None or b is None else a.astype(np.int64) * b.astype(np.int64)
        return None

    def max_code(self, name: str) -> int | None:
        """The largest uint8 code tensor ``name`` can hold (None: not a uint8 tensor we can see)."""
        node = self.producer.get(name)
        if node is None:
            value = self.constant(name)
            return None if value is None or value.dtype != np.uint8 else int(value.max(initial=0))
        if node.op_type == "Clip" and len(node.input) > 2 and node.input[2]:
            high = self.constant(node.input[2])
            return None if high is None else int(high)
        if node.op_type in ("MaxPool", "Reshape", "Flatten", "Transpose", "Slice", "Identity", "Clip"):
            return self.max_code(node.input[0])
        if node.op_type == "Concat":
            codes = [self.max_code(i) for i in node.input]
            return None if None in codes else max(codes)
        if node.op_type == "Where":
            codes = [self.max_code(i) for i in node.input[1:]]
            return None if None in codes else max(codes)
        if node.op_type == "Gather":
            table = self.constant(node.input[0])
            return None if table is None else int(table.max(initial=0))
        if node.op_type == "QuantizeLinear":
            zero_point = self.constant(node.input[2]) if len(node.input) > 2 else None
            return 255 if zero_point is not None and zero_point.dtype == np.uint8 else None
        return 255  # any other uint8 producer: assume the full range


def saturating_kernels(model: onnx.ModelProto) -> list[str]:
    """Names (output tensors) of the integer conv/matmul nodes whose u8 x s8 pair sums can
    leave int16: DequantizeLinear(uint8) and DequantizeLinear(int8 weights) into
    Conv/Gemm/MatMul (what onnxruntime fuses into QLinearConv/QGemm/QLinearMatMul), and
    ConvInteger/MatMulInteger with int8 weights."""
    graph = _Graph(model)
    found = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            x_dq, w_dq = (graph.producer.get(name) for name in node.input[:2])
            if not (x_dq is not None and w_dq is not None
                    and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
                continue
            x_name, w_name = x_dq.input[0], w_dq.input[0]
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            x_name, w_name = node.input[0], node.input[1]
        else:
            continue
        weights = graph.constant(w_name)
        if weights is None or not _signed(graph, w_name):
            continue
        high = graph.max_code(x_name)
        if high is not None and not fits_pair_sums(high, np.abs(weights).max(initial=0)):
            found.append(node.output[0])
    return found


def _signed(graph: _Graph, name: str) -> bool:
    """Whether the weight tensor ``name`` is int8 (uint8 weights take the u8 x u8 path)."""
    if name in graph.initializers:
        return graph.initializers[name].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    node = graph.producer.get(name)
    if node is None:
        return False
    if node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        return to == onnx.TensorProto.INT8
    return any(_signed(graph, i) for i in node.input)
