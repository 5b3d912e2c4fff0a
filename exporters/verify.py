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

``cpus`` repeats the fused check as onnxruntime runs on other CPUs (``qtool.emulated_cpu``): it
picks its integer kernels by the CPU's features, so a pass on this machine says nothing about the
code paths another CPU takes (int16 pair sums on x86 without VNNI; NEON, dot-product and i8mm
kernels on ARM). On ARM, QLinearAdd works in fixed point, so there the reference is PyTorch with
its residual joins computed as ARM's kernel does (``qtool.quant.integer.joins_computed_as``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from qtool import emulated_cpu
from qtool.errors import QtoolError
from qtool.onnxrt import create_session
from qtool.quant.integer import joins_computed_as

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
    cpu: str = "this CPU"
    identical_to_this_cpu: bool | None = None  # an emulated CPU's logits bit-equal to this one's
    pair_sums_saturate: bool | None = None     # that CPU's u8 x s8 kernels add pairs in int16
    joins_as: str = "x86"                      # whose QLinearAdd arithmetic the PyTorch reference used (JOIN_KERNELS)
    emulated: list[Verification] = field(default_factory=list)

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
        own = self.agreement >= MIN_AGREEMENT and self.within_step >= self.required_within_step
        return own and all(other.passed for other in self.emulated)

    def summary(self, emulated: bool = True) -> str:
        text = (f"top-1 agreement {100 * self.agreement:.2f}% on {self.samples} samples (need >= {100 * MIN_AGREEMENT:.1f}%), "
                f"logits within one output step (step {self.output_step:.4g}) on {100 * self.within_step:.2f}% of them "
                f"(need >= {100 * self.required_within_step:.1f}%); largest difference "
                f"{self.max_abs_diff / self.output_step:.1f} steps")
        if self.torch_accuracy is not None:
            text += f"; accuracy PyTorch {100 * self.torch_accuracy:.2f}% vs onnxruntime {100 * self.onnx_accuracy:.2f}%"
        if self.float64_agreement is not None:
            text += (f" (for scale, PyTorch float64 vs float32: {100 * self.float64_agreement:.2f}% top-1, "
                     f"{100 * self.float64_within_step:.2f}% within one step)")
        for other in self.emulated if emulated else ():
            text += "; " + other.cpu_summary()
        return text

    def cpu_summary(self) -> str:
        """The fused check on an emulated CPU, in one clause."""
        same = "bit-identical to" if self.identical_to_this_cpu else "different from"
        path = {True: "yes", False: "no"}.get(self.pair_sums_saturate, "unknown")
        against = f" (against PyTorch with {self.joins_as} QLinearAdd arithmetic)" if self.joins_as != "x86" else ""
        return (f"on the {self.cpu}{against}: top-1 agreement {100 * self.agreement:.2f}%, within one step "
                f"{100 * self.within_step:.2f}%, largest difference {self.max_abs_diff / self.output_step:.1f} steps, "
                f"logits {same} this CPU's (its u8 x s8 kernels sum pairs in int16: {path})")

    def to_dict(self) -> dict:
        fields = {key: value for key, value in asdict(self).items() if key != "emulated"}
        return {**fields, "emulated": [other.to_dict() for other in self.emulated], "passed": self.passed}


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


def _against(expected: np.ndarray, outputs: np.ndarray, step: float) -> dict[str, float]:
    """Top-1 agreement, share of samples within one step, largest difference."""
    return {"agreement": float((outputs.argmax(1) == expected.argmax(1)).mean()),
            "within_step": float((np.abs(outputs - expected).max(axis=1) <= step).mean()),
            "max_abs_diff": float(np.abs(outputs - expected).max())}


def compare(model: nn.Module, onnx_model: bytes | str, inputs: torch.Tensor, labels: torch.Tensor | None = None,
            threads: int = 1, noise_floor: bool = True, cpus: Sequence[str] = ()) -> Verification:
    """``noise_floor`` also runs PyTorch in float64: how far the model's own outputs move under a
    change of float rounding, the yardstick for onnxruntime's differences. ``cpus``: names from
    ``qtool.emulated_cpu.CPUS`` to run the fused check on as well."""
    inputs = inputs.float().contiguous()
    host = emulated_cpu.host_kernels()
    with joins_computed_as(model, host):  # an ARM host's own QLinearAdd is ARM's
        expected = torch_logits(model, inputs)
    array = inputs.numpy()
    fused = onnx_logits(onnx_model, array, threads)
    reference = onnx_logits(onnx_model, array, threads, optimize=False)
    step = max(float(expected.max() - expected.min()) / 255, np.finfo(np.float32).tiny)
    unoptimized = _against(expected, reference, step)
    result = Verification(samples=len(array), output_step=step, reference_agreement=unoptimized["agreement"],
                          reference_max_abs_diff=unoptimized["max_abs_diff"], **_against(expected, fused, step))
    if noise_floor and (wide := float64_logits(model, inputs)) is not None:
        floor = _against(expected, wide, step)
        result.float64_agreement, result.float64_within_step = floor["agreement"], floor["within_step"]
    expected_on = {host: expected}  # PyTorch's logits with each CPU family's join arithmetic
    for cpu in cpus:
        kernels = emulated_cpu.CPUS[cpu].kernels
        if kernels not in expected_on:
            with joins_computed_as(model, kernels):
                expected_on[kernels] = torch_logits(model, inputs)
        theirs = emulated_cpu.run(onnx_model, array, cpu, threads)
        result.emulated.append(Verification(
            samples=len(array), output_step=step, reference_agreement=result.reference_agreement,
            reference_max_abs_diff=result.reference_max_abs_diff, **_against(expected_on[kernels], theirs, step),
            float64_agreement=result.float64_agreement, float64_within_step=result.float64_within_step,
            cpu=emulated_cpu.describe(cpu), identical_to_this_cpu=bool(np.array_equal(theirs, fused)),
            pair_sums_saturate=emulated_cpu.pair_sums_saturate(cpu), joins_as=kernels))
    if labels is not None:
        truth = labels.numpy()
        result.torch_accuracy = float((expected.argmax(1) == truth).mean())
        result.onnx_accuracy = float((fused.argmax(1) == truth).mean())
    return result
