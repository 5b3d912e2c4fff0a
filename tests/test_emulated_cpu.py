"""Export verification on other x86 CPUs, emulated by qemu-x86_64 on whatever CPU runs the suite:
the emulated AVX2-only CPU really takes onnxruntime's int16 pair-sum path and qtool's exports
compute the same logits there as on this CPU; an AVX-only CPU adds residual joins without fmas,
which PyTorch reproduces; the option's mistakes are one-line errors."""

from __future__ import annotations

import functools
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool import emulated_cpu
from qtool.checkpoint import save_checkpoint
from qtool.errors import QtoolError
from qtool.exporters import export
from qtool.exporters.verify import compare
from qtool.models import build_model
from qtool.quant.integer import qlinear_add_codes_on
from qtool.quant.prepare import prepare

from join_kernels import check_join_codes, join_trials
from tiny_models import BrevitasResidualNet, as_inputs, synthetic_domains, train, trained_w4a4

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
    reason="qemu-x86_64 (apt-get install qemu-user) on an x86_64 host is needed to emulate an AVX2-only CPU")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@needs_qemu
def test_the_emulated_avx2_cpu_sums_u8_s8_pairs_in_int16_and_this_cpu_as_its_flags_say():
    # 255 x 127 pairs: 64770 does not fit int16, so only a VNNI kernel (int32 dot products) is exact
    assert emulated_cpu.pair_sums_saturate("avx2")
    has_vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})
    assert emulated_cpu.pair_sums_saturate() == (not has_vnni)


@needs_qemu
def test_a_trained_model_with_8_bit_edges_computes_the_same_logits_on_an_avx2_only_cpu(tmp_path):
    # 8-bit first/last layers on 8-bit inputs: 7-bit weight codes keep 2 * 255 * 63 inside int16
    data = synthetic_domains()
    images = as_inputs(data["b_x"][:128])
    result = export(trained_w4a4(data), images[:1], tmp_path / "tiny.onnx", calibration=as_inputs(data["a_x"][:128]),
                    verify=images, verify_cpus=("avx2",))
    here, avx2 = result.verification, result.verification.emulated[0]
    assert avx2.pair_sums_saturate and avx2.identical_to_this_cpu
    assert avx2.agreement == here.agreement and avx2.max_abs_diff == here.max_abs_diff and result.verification.passed
    assert "AVX2 without AVX-512 or VNNI" in avx2.cpu and "bit-identical" in result.verification.summary()


@needs_qemu
def test_a_brevitas_8_bit_head_routed_to_u8_u8_kernels_computes_the_same_logits_on_an_avx2_only_cpu(tmp_path):
    # the case an AVX2-only CPU once caught: 8-bit weights on 8-bit inputs would saturate u8 x s8
    data = synthetic_domains()
    torch.manual_seed(0)
    model = BrevitasResidualNet()
    images = as_inputs(np.concatenate([data["a_x"], data["b_x"]]))
    train(model, images, torch.from_numpy(np.concatenate([data["a_y"], data["b_y"]])).long(), steps=25)
    test_images = as_inputs(data["b_x"][:128])
    # fast numerics (the path that routes the head) rounds batch norm's float shift to int32, so
    # PyTorch is matched closely, not exactly (test_export.py); the question here is the CPU
    result = export(model, test_images[:1], tmp_path / "brevitas.onnx", calibration=as_inputs(data["a_x"][:128]),
                    numerics="fast")
    assert result.ops["MatMulInteger"] == 1  # the head, widened to u8 x u8
    here = compare(model.eval(), tmp_path / "brevitas.onnx", test_images, noise_floor=False, cpus=("avx2",))
    avx2 = here.emulated[0]
    assert avx2.identical_to_this_cpu and avx2.pair_sums_saturate and avx2.agreement == here.agreement >= 0.99


@needs_qemu
def test_x86_without_avx2_adds_joins_without_fmas_and_its_exports_stay_exact(tmp_path):
    # MLAS's SSE2 QLinearAdd rounds every multiply and add on its own: a few codes differ from the
    # AVX2 kernel's fmas, and PyTorch reproduces them (qlinear_add_codes_sse2)
    steps, zeros, inputs = join_trials()
    moved = check_join_codes(steps, zeros, inputs, "avx", functools.partial(qlinear_add_codes_on, "x86-sse2"))
    assert 0 < moved < 1e-3 * inputs.size / 2
    data = synthetic_domains()
    images = as_inputs(data["b_x"][:128])
    result = export(trained_w4a4(data), images[:1], tmp_path / "tiny.onnx", calibration=as_inputs(data["a_x"][:128]),
                    verify=images, verify_cpus=("avx",))
    avx = result.verification.emulated[0]
    assert avx.joins_as == "x86-sse2" and not avx.pair_sums_saturate and avx.passed and avx.max_abs_diff == 0.0


@needs_qemu
@pytest.mark.parametrize("arch, bits, act_bits", [("resnet20", 4, 8), ("mobilenetv2", 3, 3)])
def test_zoo_exports_compute_the_same_logits_on_an_avx2_only_cpu(arch, bits, act_bits, tmp_path):
    torch.manual_seed(0)
    model = prepare(build_model(arch), bits=bits, act_bits=act_bits)
    model(torch.randn(8, 3, 32, 32))  # initializes the scales
    inputs = torch.randn(48, 3, 32, 32) * 2
    result = export(model.eval(), inputs[:1], tmp_path / "m.onnx", calibration=inputs[:8], verify=inputs,
                    verify_cpus=("avx2",))
    avx2 = result.verification.emulated[0]
    assert avx2.identical_to_this_cpu and avx2.passed and avx2.max_abs_diff == result.verification.max_abs_diff


@needs_qemu
def test_cli_export_verifies_on_the_emulated_cpu_and_reports_it(run_cli, digits_small, tmp_path):
    torch.manual_seed(0)
    model = prepare(build_model("resnet20"), bits=4, act_bits=4)
    model(torch.randn(8, 3, 32, 32))
    save_checkpoint(tmp_path / "model.pt", model.eval(), "resnet20", 10, 3, 32, {})
    code, out, err = run_cli("export", tmp_path / "model.pt", "-o", tmp_path / "m.onnx", "--data", digits_small,
                             "--target-domain", "mnist_m", "--calibration", "8", "--verify", "32",
                             "--verify-cpu", "avx2", "--json", tmp_path / "report.json")
    assert code == 0, err
    assert "emulated" in out and "EPYC-Rome" in out
    report = json.loads((tmp_path / "report.json").read_text())["verification"]
    assert report["passed"] and report["emulated"][0]["identical_to_this_cpu"] is True
    assert report["emulated"][0]["pair_sums_saturate"] is True and report["emulated"][0]["samples"] == 32


def test_verify_cpu_mistakes_are_one_line_errors_and_write_nothing(run_cli, digits_small, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = prepare(build_model("resnet20"), bits=4, act_bits=4)
    model(torch.randn(8, 3, 32, 32))
    save_checkpoint(tmp_path / "model.pt", model.eval(), "resnet20", 10, 3, 32, {})
    args = ["export", tmp_path / "model.pt", "-o", tmp_path / "m.onnx", "--data", digits_small, "--calibration", "8"]
    code, _, err = run_cli(*args, "--verify-cpu", "avx2")
    assert code == 2 and err.startswith("error: ") and "--verify N" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(emulated_cpu.shutil, "which", lambda name: None)
    code, _, err = run_cli(*args, "--verify", "8", "--verify-cpu", "avx2")
    assert code == 2 and "qemu-x86_64" in err and "apt-get install qemu-user" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(*args, "--verify", "8", "--verify-cpu", "avx512")
    assert code == 2 and "avx512" in err
    monkeypatch.undo()  # qemu is back; the ARM CPUs also need the aarch64 Python, here absent
    monkeypatch.setenv("QTOOL_ARM_SYSROOT", str(tmp_path / "no-sysroot"))
    if shutil.which("qemu-aarch64"):
        code, _, err = run_cli(*args, "--verify", "8", "--verify-cpu", "neon")
        assert code == 2 and "python -m qtool.arm_sysroot" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(QtoolError, match="unknown CPU"):
        emulated_cpu.run(b"", np.zeros(1, np.float32), "sse2")
