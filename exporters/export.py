"""``qtool.export``: a quantized PyTorch model -> an ONNX file onnxruntime runs on integer kernels.

    trace + calibrate (capture.py) -> fold BN, sink reshapes (passes.py) -> QDQ ONNX (onnx_graph.py)
    -> onnx.checker (full check) -> no u8 x s8 kernel may saturate without VNNI (bounds.py)
    -> onnxruntime's optimized graph must run every quantized layer
    as an integer kernel -> optional verification against PyTorch (verify.py) -> atomic write.

Nothing is written unless every check passed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from qtool import emulated_cpu
from qtool.atomic import atomic_path
from qtool.errors import QtoolError
from qtool.exporters.adapters import ExportError
from qtool.exporters.bounds import saturating_kernels
from qtool.exporters.capture import calibration_ranges_are_finite, capture
from qtool.exporters.onnx_graph import OnnxBuilder
from qtool.exporters.passes import prepare_graph
from qtool.exporters.verify import Verification, VerificationError, compare
from qtool.onnxrt import float_layers, optimized_census

WEIGHT_STORAGES = ("int8", "int4")
NUMERICS = ("faithful", "fast")
DEFAULT_OPSET = {"int8": 17, "int4": 21}
MAX_OPSET = 26  # the newest onnxruntime 1.32 loads


@dataclass
class ExportResult:
    path: str
    bytes: int
    opset: int
    weight_storage: str
    numerics: str                            # the numerics used
    numerics_note: str | None                # why they differ from the ones asked, if they do
    quantized_layers: int
    float_layers: int
    ops: dict[str, int]                      # onnxruntime's optimized graph: what it runs
    notes: list[str] = field(default_factory=list)
    verification: Verification | None = None

    def to_dict(self) -> dict:
        result = {k: v for k, v in self.__dict__.items() if k != "verification"}
        result["verification"] = self.verification.to_dict() if self.verification else None
        return result


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work when ``path`` cannot be written (one line, nothing left behind)."""
    path = Path(path)
    if path.is_dir():
        raise QtoolError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _opset(weight_storage: str, opset: int | None) -> int:
    if weight_storage not in WEIGHT_STORAGES:
        raise QtoolError(f"weight storage must be one of {', '.join(WEIGHT_STORAGES)}, got {weight_storage!r}")
    opset = DEFAULT_OPSET[weight_storage] if opset is None else opset
    minimum = 21 if weight_storage == "int4" else 13  # INT4 tensors: opset 21; per-channel DQ: 13
    if not minimum <= opset <= MAX_OPSET:
        raise QtoolError(f"opset {opset} is out of range for {weight_storage} weights: use {minimum} to {MAX_OPSET}")
    return opset


def _check_kernels(census: dict[str, int], quantized: int, floating: int) -> None:
    """Every quantized layer must have become an integer kernel in onnxruntime's graph."""
    float_compute = sum(float_layers(census).values())
    if float_compute > floating:
        raise ExportError(f"onnxruntime kept {float_compute - floating} quantized layer(s) in float "
                          f"({', '.join(f'{k}×{v}' for k, v in float_layers(census).items())}); "
                          "the exported graph does not fuse")
    weighted = sum(census.get(op, 0) for op in ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger",
                                               "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits"))
    if weighted < quantized:
        raise ExportError(f"only {weighted} of {quantized} quantized layers run as integer kernels in onnxruntime")


def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
           verify: torch.Tensor | None = None, labels: torch.Tensor | None = None,
           calibration: torch.Tensor | None = None, weight_storage: str = "int8", opset: int | None = None,
           numerics: str = "faithful", threads: int = 1, verify_cpus: Sequence[str] = ()) -> ExportResult:
    """Export ``model`` (qtool-prepared, Brevitas, or plain float) to ``path``.

    ``example_input`` fixes the input shape (any batch size). ``calibration`` (default: the
    example) is a representative batch used only for tensors the model does not quantize itself,
    such as residual sums. ``verify`` runs onnxruntime and PyTorch on those inputs and raises
    ``VerificationError`` when they disagree beyond the tolerances (nothing is written then);
    ``verify_cpus`` (names from ``qtool.emulated_cpu.CPUS``) repeats that check on emulated CPUs.
    """
    opset = _opset(weight_storage, opset)
    if verify_cpus and verify is None:
        raise QtoolError("checking other CPUs needs verification inputs (--verify N)")
    emulated_cpu.require(verify_cpus)
    if numerics not in NUMERICS:
        raise QtoolError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    path = check_output_path(path)
    calibration = example_input if calibration is None else calibration
    was_training = model.training
    model.eval()
    try:
        graph = capture(model, calibration.float())
        calibration_ranges_are_finite(graph)
        numerics_note = None
        if numerics == "fast" and any(op.kind == "sign" for op in graph.ops):
            # fast numerics requantizes residual streams to uint8; a value within half a step of
            # zero would then binarize to +1 where PyTorch gives -1, and binary nets amplify that
            numerics = "faithful"
            numerics_note = "--numerics fast asked; binary layers need exact signs, so faithful was used"
        prepare_graph(graph)
        onnx_model = OnnxBuilder(graph, weight_storage, opset, numerics).build()
        try:
            onnx.checker.check_model(onnx_model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the ONNX checker rejects the exported graph: {str(exc).splitlines()[0]}") from None
        saturating = saturating_kernels(onnx_model)
        if saturating:  # the writer routes such layers to u8 x u8 kernels: this is a safety net
            raise ExportError(f"integer kernel(s) {', '.join(saturating[:3])} could saturate int16 pair sums on x86 "
                              "without VNNI; the export would not be exact on every CPU")
        data = onnx_model.SerializeToString()
        weighted = [op for op in graph.ops if op.kind in ("conv", "linear")]
        quantized = sum(op.attrs["weights"] is not None for op in weighted)
        census = optimized_census(data, threads)
        # a BatchNorm that cannot fold into a conv (BN after ReLU, as binary networks have) stays
        # a per-channel Mul/Add, which onnxruntime's NCHWc pass may run as a 1x1 depthwise Conv
        affines = sum(op.kind == "batchnorm" and len(graph.shapes[op.inputs[0]]) == 3 for op in graph.ops)
        _check_kernels(census, quantized, len(weighted) - quantized + affines)
        verification = None
        if verify is not None:
            verification = compare(model, data, verify, labels, threads, cpus=verify_cpus)
            if not verification.passed:
                hint = ("; fast numerics rounds float biases and puts float sums on 8-bit grids, --numerics faithful "
                        "keeps them exact" if numerics == "fast" and graph.notes else "")
                raise VerificationError(f"onnxruntime does not reproduce PyTorch: {verification.summary()}{hint}")
    finally:
        model.train(was_training)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    return ExportResult(str(path), len(data), opset, weight_storage, numerics, numerics_note, quantized,
                        len(weighted) - quantized, census,
                        sorted(set(graph.notes)), verification)
