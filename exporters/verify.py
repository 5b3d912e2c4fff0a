"""onnxruntime against PyTorch on the same inputs: does the exported file compute the trained model?

Pass criteria (``qtool export --verify N``):
- top-1 agreement >= 99.5 % between onnxruntime's integer kernels and the PyTorch model;
- on >= 99.5 % of the samples, every logit within one *output step* of PyTorch's: the step of
  an 8-bit quantizer spanning the PyTorch logits' range, ``(max - min) / 255``. The same 0.5 %
  allowance as for top-1: in a 4-bit network a code that flips at a rounding boundary (float
  summation order, the int32 bias the integer kernels need) moves the next layers by whole
  steps, so a rare sample differs by more even between PyTorch in float32 and float64.

The same inputs also run with onnxruntime's graph optimizations off (``reference``): that is the
ONNX graph's own float QDQ semantics, and separates an exporter bug (reference already off)
from integer-kernel rounding (reference on, fused off).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.onnxrt import create_session

MIN_AGREEMENT = 0.995
# The within-step bar follows PyTorch's own float64-vs-float32 rate down to this floor and no
# further: a model whose outputs move that much under a change of float rounding is not verified.
MIN_WITHIN_STEP_FLOOR = 0.98


class VerificationError(QtoolError):
    """The exported model does not reproduce PyTorch within the tolerances."""


@dataclass
class Verification:
    samples: int
    agreement: float             # top-1, fused integer kernels vs PyTorch
    within_step: float           # fraction of samples whose logits are all within one output step
    max_abs_diff: float          # largest logit difference, fused vs PyTorch
    output_step: float           # one step of an 8-bit grid over the PyTorch logits' range
    reference_agreement: float   # onnxruntime without graph optimizations vs PyTorch
    reference_max_abs_diff: float
    torch_accuracy: float | None = None
    onnx_accuracy: float | None = None
    float64_agreement: float | None = None    # PyTorch float64 vs float32: the model's own noise floor
    float64_within_step: float | None = None

    @property
    def required_within_step(self) -> float:
        """99.5 %, or less where the model's own float64 recomputation stays within one step less
        often (a 4-bit network flips codes at rounding boundaries under any change of float
        rounding, and onnxruntime cannot be held closer to PyTorch than PyTorch is to itself),
        but never below ``MIN_WITHIN_STEP_FLOOR``."""
        if self.float64_within_step is None:
            return MIN_AGREEMENT
        return max(MIN_WITHIN_STEP_FLOOR, min(MIN_AGREEMENT, self.float64_within_step))

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.within_step >= self.required_within_step

    def summary(self) -> str:
        text = (f"top-1 agreement {100 * self.agreement:.2f}% on {self.samples} samples (need >= {100 * MIN_AGREEMENT:.1f}%), "
                f"logits within one output step (step {self.output_step:.4g}) on {100 * self.within_step:.2f}% of them "
                f"(need >= {100 * self.required_within_step:.1f}%); largest difference "
                f"{self.max_abs_diff / self.output_step:.1f} steps")
        if self.torch_accuracy is not None:
            text += f"; accuracy PyTorch {100 * self.torch_accuracy:.2f}% vs onnxruntime {100 * self.onnx_accuracy:.2f}%"
        if self.float64_agreement is not None:
            text += (f" (for scale, PyTorch float64 vs float32: {100 * self.float64_agreement:.2f}% top-1, "
                     f"{100 * self.float64_within_step:.2f}% within one step)")
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _plain(output) -> torch.Tensor:
    output = output[0] if isinstance(output, (tuple, list)) else output
    return output.value if hasattr(output, "value") and hasattr(output, "scale") else output


@torch.no_grad()
def torch_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([_plain(model(inputs[i:i + batch_size])).float().numpy()
                           for i in range(0, len(inputs), batch_size)])


def onnx_logits(model: bytes | str, inputs: np.ndarray, threads: int = 1, optimize: bool = True,
                batch_size: int = 256) -> np.ndarray:
    session = create_session(model, threads, optimize=optimize)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def float64_logits(model: nn.Module, inputs: torch.Tensor) -> np.ndarray | None:
    """The model in float64 (None when it cannot run so, e.g. a layer with float32-only code)."""
    try:
        twin = copy.deepcopy(model).double()
        return torch_logits(twin, inputs.double()).astype(np.float32)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None


def compare(model: nn.Module, onnx_model: bytes | str, inputs: torch.Tensor, labels: torch.Tensor | None = None,
            threads: int = 1, noise_floor: bool = True) -> Verification:
    """``noise_floor`` also runs PyTorch in float64: how far the model's own outputs move under a
    change of float rounding, the yardstick for onnxruntime's differences."""
    inputs = inputs.float().contiguous()
    expected = torch_logits(model, inputs)
    array = inputs.numpy()
    fused = onnx_logits(onnx_model, array, threads)
    reference = onnx_logits(onnx_model, array, threads, optimize=False)
    step = max(float(expected.max() - expected.min()) / 255, np.finfo(np.float32).tiny)
    top = expected.argmax(1)
    result = Verification(
        samples=len(array),
        agreement=float((fused.argmax(1) == top).mean()),
        within_step=float((np.abs(fused - expected).max(axis=1) <= step).mean()),
        max_abs_diff=float(np.abs(fused - expected).max()),
        output_step=step,
        reference_agreement=float((reference.argmax(1) == top).mean()),
        reference_max_abs_diff=float(np.abs(reference - expected).max()),
    )
    if noise_floor and (wide := float64_logits(model, inputs)) is not None:
        result.float64_agreement = float((wide.argmax(1) == top).mean())
        result.float64_within_step = float((np.abs(wide - expected).max(axis=1) <= step).mean())
    if labels is not None:
        truth = labels.numpy()
        result.torch_accuracy = float((top == truth).mean())
        result.onnx_accuracy = float((fused.argmax(1) == truth).mean())
    return result
