"""onnxruntime as another x86 CPU runs it: the process under qemu-user with that CPU's model.

onnxruntime picks its integer kernels by CPUID, so a check on one CPU covers that CPU's code
paths only. Without VNNI, its u8 x s8 kernels add pairs of products in int16 and saturate
(``qtool.exporters.bounds``); a VNNI machine never takes that path. ``qemu-x86_64 -cpu MODEL``
shows the process MODEL's CPUID and emulates its instructions, so onnxruntime dispatches as it
would on that CPU. For correctness only: emulation is 10-20x slower.

Limits: QEMU's TCG (7.2) emulates up to AVX2, not AVX-512, so the AVX-512-without-VNNI path
(the same int16 pair sums, wider) cannot be checked this way; the Python, numpy and onnxruntime
wheels need AVX, so pre-AVX CPUs do not run at all.

Torch-free, like ``qtool.onnxrt``: the child process imports only numpy and onnxruntime.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError

# name -> (QEMU CPU model, what it stands for)
CPUS = {
    "avx2": ("EPYC-Rome", "AVX2 without AVX-512 or VNNI, as on AMD EPYC Zen 2"),
}
TIMEOUT_S = 1800


def describe(cpu: str) -> str:
    model, what = _model(cpu)
    return f"emulated {cpu} CPU (qemu {model}: {what})"


def _model(cpu: str) -> tuple[str, str]:
    if cpu not in CPUS:
        raise QtoolError(f"unknown CPU {cpu!r} to emulate; choose from {', '.join(CPUS)}")
    return CPUS[cpu]


def require(cpus) -> None:
    """Fail now, before any expensive work, when a name is unknown or qemu is missing."""
    for cpu in cpus:
        _model(cpu)
    if cpus:
        emulator()


def emulator() -> str:
    """The qemu-x86_64 binary, or a one-line error saying how to get it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise QtoolError(f"emulating an x86 CPU needs an x86_64 host; this one is {platform.machine()}")
    path = shutil.which("qemu-x86_64")
    if path is None:
        raise QtoolError("emulating another x86 CPU needs qemu-x86_64 (Debian/Ubuntu: apt-get install qemu-user)")
    return path


def run(model: bytes | str | os.PathLike, inputs: np.ndarray, cpu: str, threads: int = 1,
        batch_size: int = 256) -> np.ndarray:
    """``model``'s first output on ``inputs``, computed by onnxruntime on the emulated ``cpu``."""
    qemu_model, _ = _model(cpu)
    qemu = emulator()
    with tempfile.TemporaryDirectory(prefix="qtool-emulated-") as folder:
        folder = Path(folder)
        if isinstance(model, bytes):
            (folder / "model.onnx").write_bytes(model)
            model = folder / "model.onnx"
        np.save(folder / "inputs.npy", np.ascontiguousarray(inputs))
        command = [qemu, "-cpu", qemu_model, sys.executable, "-m", "qtool.emulated_cpu",
                   str(model), str(folder / "inputs.npy"), str(folder / "outputs.npy"), str(threads), str(batch_size)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise QtoolError(f"onnxruntime on the {describe(cpu)} took over {TIMEOUT_S} s") from None
        if done.returncode != 0:
            # qemu warns about CPUID bits TCG lacks (xsaves...): noise, not the reason
            lines = [line for line in done.stderr.splitlines() if line.strip() and "TCG doesn't support" not in line]
            raise QtoolError(f"onnxruntime failed on the {describe(cpu)}: {lines[-1] if lines else done.returncode}")
        return np.load(folder / "outputs.npy")


def pair_sums_saturate(cpu: str | None = None) -> bool:
    """Whether onnxruntime's u8 x s8 MatMulInteger saturates in int16 on ``cpu`` (None: this one).

    255 x 127 in every position: exact int32 sums on VNNI, ``32767`` per pair without it. It shows
    that an emulated check really ran the path the exporter's bound protects."""
    from onnx import TensorProto, helper, numpy_helper

    depth = 64
    weights = np.full((depth, 8), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "pair_sums",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    inputs = np.full((1, depth), 255, np.uint8)
    if cpu is None:
        from qtool.onnxrt import create_session

        output = create_session(model).run(None, {"x": inputs})[0]
    else:
        output = run(model, inputs, cpu)
    return bool((output != inputs.astype(np.int32) @ weights.astype(np.int32)).any())


def _child(model: str, inputs: str, outputs: str, threads: str, batch_size: str) -> None:
    from qtool.onnxrt import create_session

    session = create_session(model, int(threads))
    name, batch, data = session.get_inputs()[0].name, int(batch_size), np.load(inputs)
    np.save(outputs, np.concatenate([session.run(None, {name: data[i:i + batch]})[0]
                                     for i in range(0, len(data), batch)]))


if __name__ == "__main__":
    _child(*sys.argv[1:])
