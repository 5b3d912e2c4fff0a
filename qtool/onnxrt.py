"""onnxruntime sessions with the settings qtool pins, and the census of what onnxruntime ran.

Torch-free on purpose: ``qtool bench`` runs on an edge device where only onnxruntime and numpy
are installed. The ``onnx`` package is not needed either; the census reads the optimized model's
protobuf directly (``op_census``).

Pinned settings (and why they matter for comparing against PyTorch bit for bit):

- ``ORT_ENABLE_ALL``: the level a deployment uses. It is the level at which QuantizeLinear /
  DequantizeLinear pairs around Conv, Gemm, Add and pooling become QLinearConv, QGemm,
  QLinearAdd... so verification checks the integer kernels that will actually run.
- ``intra_op_num_threads`` explicit, ``inter_op_num_threads = 1``, sequential execution: results
  and timings do not depend on how many cores the host happens to have.
- ``use_deterministic_compute``: run-to-run identical outputs.
- ``session.qdq_matmulnbits_accuracy_level = 1`` (fp32 compute): onnxruntime's default (4)
  silently quantizes the activations of fused 4-bit MatMuls to int8, which is a different model.
- ``mlas.enable_gemm_fastmath_arm64_bfloat16 = 0``: on ARM, bf16 fast math would round fp32
  GEMMs (float layers the plan left unquantized) to bf16.
- ``session.disable_quant_qdq = 0``: Q/DQ fusion on (the default, stated so nobody flips it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError

PINNED_CONFIG = {
    "session.qdq_matmulnbits_accuracy_level": "1",
    "mlas.enable_gemm_fastmath_arm64_bfloat16": "0",
    "session.disable_quant_qdq": "0",
}

# Operators that compute on integers: what a quantized layer must become after optimization.
INTEGER_OPS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax",
}
# Float compute operators: in a quantized model they mark a layer that stayed in float.
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "ConvTranspose"}


def session_options(threads: int = 1, optimized_model_path: str | os.PathLike | None = None,
                    optimize: bool = True):
    import onnxruntime as ort

    if threads < 1:
        raise QtoolError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = True
    options.log_severity_level = 3  # errors only: ORT warns when it saves an NCHWc-optimized graph
    for key, value in PINNED_CONFIG.items():
        options.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def create_session(model: str | os.PathLike | bytes, threads: int = 1,
                   optimized_model_path: str | os.PathLike | None = None, optimize: bool = True):
    """A CPU session for ``model`` (a path or serialized bytes); a one-line error for a bad file."""
    import onnxruntime as ort

    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise QtoolError(f"ONNX model not found: {path}" if not path.exists() else f"{path} is not a file")
        model = str(path)
    try:
        return ort.InferenceSession(model, session_options(threads, optimized_model_path, optimize),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = "the model" if isinstance(model, bytes) else model
        raise QtoolError(f"onnxruntime cannot load {name}: {first[:300]}") from None


def optimized_census(model: str | os.PathLike | bytes, threads: int = 1) -> dict[str, int]:
    """Operator counts of the graph onnxruntime optimized for this CPU (what it actually runs)."""
    with tempfile.TemporaryDirectory(prefix="qtool-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        create_session(model, threads, optimized_model_path=optimized)
        return op_census(optimized.read_bytes())


def float_layers(census: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in census.items() if op in FLOAT_COMPUTE_OPS}


def integer_layers(census: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in census.items() if op in INTEGER_OPS}


def random_feed(session, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right shape and type; symbolic (batch) dimensions become ``batch``."""
    generator = np.random.default_rng(seed)
    feed = {}
    for spec in session.get_inputs():
        shape = [dim if isinstance(dim, int) and dim > 0 else batch for dim in spec.shape]
        kind = spec.type.removeprefix("tensor(").removesuffix(")")
        if kind == "float":
            feed[spec.name] = generator.uniform(-1, 1, size=shape).astype(np.float32)
        elif kind in ("uint8", "int8", "int32", "int64"):
            info = np.iinfo(kind)
            feed[spec.name] = generator.integers(max(info.min, -128), min(info.max, 127), size=shape).astype(kind)
        else:
            raise QtoolError(f"input {spec.name!r} has type {spec.type}; bench feeds float and integer inputs only")
    return feed


# -- a protobuf reader for ModelProto, enough to count operators --------------------------
# ModelProto.graph = 7; GraphProto.node = 1; NodeProto.op_type = 4, .attribute = 5;
# AttributeProto.g = 6, .graphs = 11 (subgraphs of If/Loop/Scan).

def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, value) for each field; length-delimited values as memoryviews."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _count_graph(graph: memoryview, counts: dict[str, int]) -> None:
    for number, node in _fields(graph):
        if number != 1:
            continue
        for field, value in _fields(node):
            if field == 4:
                op = bytes(value).decode()
                counts[op] = counts.get(op, 0) + 1
            elif field == 5:
                for attr_field, attr_value in _fields(value):
                    if attr_field in (6, 11):
                        _count_graph(attr_value, counts)


def op_census(model_bytes: bytes) -> dict[str, int]:
    """``{op_type: count}`` over the graph (and subgraphs) of a serialized ONNX model."""
    counts: dict[str, int] = {}
    try:
        for number, value in _fields(memoryview(model_bytes)):
            if number == 7:
                _count_graph(value, counts)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise QtoolError(f"not an ONNX model ({exc})") from None
    return dict(sorted(counts.items()))
