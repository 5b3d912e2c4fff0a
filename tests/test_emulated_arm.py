"""Export verification on ARM CPUs, emulated by qemu-aarch64 with an aarch64 Python and the same
onnxruntime release (``qtool.arm_sysroot``): onnxruntime's ARM kernels are really dispatched by
the core it is shown; its QLinearMul gives x86's codes and its fixed-point QLinearAdd the codes
``qlinear_add_codes_neon`` computes; qtool's exports compute the trained model's logits there,
with the residual joins as ARM computes them."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from qtool import emulated_cpu
from qtool.errors import QtoolError
from qtool.exporters import export
from qtool.models import build_model
from qtool.quant.integer import qlinear_add_codes_on
from qtool.quant.prepare import prepare

from join_kernels import check_join_codes, join_trials
from tiny_models import as_inputs, synthetic_domains, trained_w4a4

ARM_CPUS = ("neon", "neondot", "i8mm")
needs_arm = pytest.mark.skipif(emulated_cpu.unavailable("neon") is not None,
                               reason=str(emulated_cpu.unavailable("neon")))


@needs_arm
def test_onnxruntime_picks_its_dot_product_kernels_by_the_arm_core_it_is_shown(monkeypatch):
    # Cortex-A53 has no dot product: shown its own /proc/cpuinfo, onnxruntime's integer kernels run
    # (and exactly: ARM widens u8 x s8 products, no int16 pair sums); shown Neoverse N1's, they use
    # SDOT/UDOT and the emulated A53 stops with an illegal instruction
    assert not emulated_cpu.pair_sums_saturate("neon")
    lying = dataclasses.replace(emulated_cpu.CPUS["neondot"], qemu_model="cortex-a53",
                                what="a Cortex-A53 shown Neoverse N1's /proc/cpuinfo")
    monkeypatch.setitem(emulated_cpu.CPUS, "a53-as-n1", lying)
    with pytest.raises(QtoolError, match="Illegal instruction"):
        emulated_cpu.pair_sums_saturate("a53-as-n1")


@needs_arm
def test_a_trained_model_computes_the_same_logits_on_every_emulated_arm_cpu(tmp_path):
    data = synthetic_domains()
    images = as_inputs(data["b_x"][:128])
    result = export(trained_w4a4(data), images[:1], tmp_path / "tiny.onnx", calibration=as_inputs(data["a_x"][:128]),
                    verify=images, verify_cpus=ARM_CPUS)
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= set(result.ops)  # depthwise and dense convs, the join, the head
    here = result.verification
    assert here.passed and [arm.cpu.split()[1] for arm in here.emulated] == list(ARM_CPUS)
    for arm in here.emulated:  # exact against the trained model with ARM's join arithmetic
        assert arm.joins_as == "arm" and not arm.pair_sums_saturate
        assert arm.passed and arm.agreement == 1.0 and arm.max_abs_diff == 0.0


@needs_arm
def test_arms_qlinear_add_is_reproduced_in_fixed_point_and_its_qlinear_mul_gives_x86s_codes():
    steps, zeros, inputs = join_trials()
    steps[-3:, 1] = steps[-3:, 2] * np.float32(3e-5)  # ratio_b below 2^-14: ARM's float fallback
    moved = check_join_codes(steps, zeros, inputs, "neon", functools.partial(qlinear_add_codes_on, "arm"))
    assert 0 < moved < 1e-3 * inputs.size / 2  # rare, but there: x86 and ARM disagree on a few codes


@needs_arm
def test_an_8_bit_residual_network_is_exact_on_arm_against_arms_join_arithmetic(tmp_path):
    torch.manual_seed(0)
    model = prepare(build_model("resnet20"), bits=4, act_bits=8)
    model(torch.randn(8, 3, 32, 32))  # initializes the scales
    inputs = torch.randn(48, 3, 32, 32) * 2
    result = export(model.eval(), inputs[:1], tmp_path / "m.onnx", calibration=inputs[:8], verify=inputs,
                    verify_cpus=("neondot",))
    arm = result.verification.emulated[0]
    assert arm.joins_as == "arm" and arm.passed and arm.agreement == 1.0 and arm.max_abs_diff == 0.0
