"""onnxruntime as another CPU runs it: the process under qemu-user with that CPU's model.

onnxruntime picks its integer kernels by the CPU's features, so a check on one CPU covers that
CPU's code paths only. x86: without VNNI, its u8 x s8 kernels add pairs of products in int16 and
saturate (``qtool.exporters.bounds``); a VNNI machine never takes that path. ``qemu-x86_64 -cpu
MODEL`` shows the process MODEL's CPUID and emulates its instructions, so onnxruntime dispatches
as it would on that CPU. ARM: onnxruntime's aarch64 build has its own kernels (NEON, the dot
product, int8 matrix multiply), run by an aarch64 Python under ``qemu-aarch64 -cpu MODEL``
(``qtool.arm_sysroot``). For correctness only: emulation is 10-20x slower.

onnxruntime reads an ARM core's features from the auxiliary vector, which qemu fills for MODEL,
and its part number (MIDR) from /proc/cpuinfo, which QEMU 7.2 passes through from the x86 host;
for a part it knows to have the dot product it uses it whatever the flags say (Neoverse N1's
MIDR on a Cortex-A53 model stops with an illegal instruction). So the ARM child runs in a
private mount namespace (``unshare``, as root or in a user namespace) where /proc/cpuinfo is a
file describing MODEL.

Limits: QEMU's TCG (7.2) emulates up to AVX2, not AVX-512, so the AVX-512-without-VNNI path
(the same int16 pair sums, wider) cannot be checked this way; the Python, numpy and onnxruntime
wheels need AVX, so pre-AVX CPUs do not run at all; ARM's SME and Apple's AMX are not emulated.

Torch-free, like ``qtool.onnxrt``: the child process imports only numpy and onnxruntime.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool import arm_sysroot
from qtool.errors import QtoolError


@dataclass(frozen=True)
class EmulatedCpu:
    arch: str          # "x86_64" or "aarch64"
    qemu_model: str    # qemu's -cpu
    what: str          # what it stands for
    kernels: str = "x86"  # whose QLinearAdd arithmetic it runs (``qtool.quant.integer.JOIN_KERNELS``)
    midr: tuple[int, int, int] = (0, 0, 0)  # ARM: implementer, variant, part, for /proc/cpuinfo
    features: str = ""                       # ARM: the Features line of /proc/cpuinfo (Linux's names)

    def cpuinfo(self) -> str:
        """/proc/cpuinfo as Linux writes it on this ARM core (two of them)."""
        implementer, variant, part = self.midr
        return "".join(f"processor\t: {index}\nBogoMIPS\t: 50.00\nFeatures\t: {self.features}\n"
                       f"CPU implementer\t: {implementer:#x}\nCPU architecture: 8\nCPU variant\t: {variant:#x}\n"
                       f"CPU part\t: {part:#05x}\nCPU revision\t: 1\n\n" for index in range(2))


_V80 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_V82 = _V80.replace(" cpuid", " atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs")
CPUS = {
    "avx2": EmulatedCpu("x86_64", "EPYC-Rome", "AVX2 without AVX-512 or VNNI, as on AMD EPYC Zen 2"),
    "avx": EmulatedCpu("x86_64", "SandyBridge", "AVX without AVX2 or FMA, as on Intel Sandy Bridge", "x86-sse2"),
    "neon": EmulatedCpu("aarch64", "cortex-a53", "ARMv8-A NEON without the dot product, as on Cortex-A53 "
                        "(Raspberry Pi 3)", "arm", (0x41, 0x0, 0xD03), _V80),
    "neondot": EmulatedCpu("aarch64", "neoverse-n1", "ARMv8.2-A with the dot product, as on Neoverse N1 "
                           "(AWS Graviton2) and Cortex-A76 (Raspberry Pi 5)", "arm", (0x41, 0x3, 0xD0C), _V82),
    "i8mm": EmulatedCpu("aarch64", "max", "ARMv8.6-A with int8 matrix multiply (i8mm) and SVE, as on Neoverse V1 "
                        "(AWS Graviton3)", "arm", (0x41, 0x1, 0xD40),
                        _V82 + " jscvt fcma sha3 sm3 sm4 sha512 sve asimdfhm dit uscat ilrcpc flagm paca pacg dcpodp "
                        "svei8mm svebf16 i8mm bf16 dgh rng"),
}
TIMEOUT_S = 1800


def host_kernels() -> str:
    """Whose QLinearAdd arithmetic onnxruntime runs on this machine: "arm" on aarch64, "x86" on
    x86 with AVX2 and FMA, "x86-sse2" on older x86 (``qtool.quant.integer.JOIN_KERNELS``)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "x86"
    return "x86" if {"avx2", "fma"} <= set(flags) else "x86-sse2"


def describe(cpu: str) -> str:
    spec = _spec(cpu)
    return f"emulated {cpu} CPU (qemu {spec.qemu_model}: {spec.what})"


def _spec(cpu: str) -> EmulatedCpu:
    if cpu not in CPUS:
        raise QtoolError(f"unknown CPU {cpu!r} to emulate; choose from {', '.join(CPUS)}")
    return CPUS[cpu]


def require(cpus) -> None:
    """Fail now, before any expensive work, when a name is unknown or what it needs is missing."""
    for cpu in cpus:
        _spec(cpu)
    for arch in sorted({_spec(cpu).arch for cpu in cpus}):
        emulator(arch)
        if arch == "aarch64":
            arm_sysroot.find()
            _namespace_command()


def unavailable(cpu: str) -> str | None:
    """Why ``cpu`` cannot be emulated here (one line), or None when it can."""
    try:
        require([cpu])
    except QtoolError as exc:
        return str(exc)
    return None


def emulator(arch: str = "x86_64") -> str:
    """The qemu-user binary for ``arch``, or a one-line error saying how to get it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise QtoolError(f"emulating another CPU needs an x86_64 host; this one is {platform.machine()}")
    path = shutil.which(f"qemu-{arch}")
    if path is None:
        raise QtoolError(f"emulating {'an ARM' if arch == 'aarch64' else 'another x86'} CPU needs qemu-{arch} "
                         "(Debian/Ubuntu: apt-get install qemu-user)")
    return path


def _namespace_command() -> list[str]:
    """``unshare`` into a private mount namespace (a user namespace too when not root)."""
    if shutil.which("unshare") is None:
        raise QtoolError("emulating an ARM CPU needs unshare (util-linux) to show it its own /proc/cpuinfo")
    command = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*command, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise QtoolError(f"emulating an ARM CPU needs a private mount namespace, and `{' '.join(command)}` failed: "
                         f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return command


def _command(cpu: str, folder: Path, child_args: list[str]) -> list[str]:
    spec = _spec(cpu)
    qemu = emulator(spec.arch)
    child = ["-m", "qtool.emulated_cpu", *child_args]
    if spec.arch == "x86_64":
        return [qemu, "-cpu", spec.qemu_model, sys.executable, *child]
    sysroot = arm_sysroot.find()
    cpuinfo = folder / "cpuinfo"
    cpuinfo.write_text(spec.cpuinfo())
    # numpy and onnxruntime from the aarch64 site first, then qtool's own (pure Python) package
    path = f"{sysroot.site}{os.pathsep}{Path(__file__).resolve().parents[1]}"
    return [*_namespace_command(), "--", "sh", "-c", 'mount --bind "$0" /proc/cpuinfo && exec "$@"', str(cpuinfo),
            qemu, "-cpu", spec.qemu_model, "-L", str(sysroot.root), "-E", f"PYTHONPATH={path}", str(sysroot.python),
            *child]


def run(model: bytes | str | os.PathLike, inputs: np.ndarray, cpu: str, threads: int = 1,
        batch_size: int = 256) -> np.ndarray:
    """``model``'s first output on ``inputs``, computed by onnxruntime on the emulated ``cpu``."""
    with tempfile.TemporaryDirectory(prefix="qtool-emulated-") as folder:
        folder = Path(folder)
        if isinstance(model, bytes):
            (folder / "model.onnx").write_bytes(model)
            model = folder / "model.onnx"
        np.save(folder / "inputs.npy", np.ascontiguousarray(inputs))
        command = _command(cpu, folder, [str(model), str(folder / "inputs.npy"), str(folder / "outputs.npy"),
                                         str(threads), str(batch_size)])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise QtoolError(f"onnxruntime on the {describe(cpu)} took over {TIMEOUT_S} s") from None
        if done.returncode != 0:
            # qemu warns about CPUID bits TCG lacks (xsaves...): noise, not the reason
            lines = [line for line in done.stderr.splitlines() if line.strip() and "TCG doesn't support" not in line]
            raise QtoolError(f"onnxruntime failed on the {describe(cpu)}: {lines[-1] if lines else done.returncode}")
        return np.load(folder / "outputs.npy")


@functools.lru_cache(maxsize=None)  # a property of the CPU: one emulated run each per process
def pair_sums_saturate(cpu: str | None = None) -> bool:
    """Whether onnxruntime's u8 x s8 MatMulInteger saturates in int16 on ``cpu`` (None: this one).

    255 x 127 in every position: exact int32 sums on VNNI and on ARM (whose kernels widen before
    adding), ``32767`` per pair on x86 without VNNI. It shows that an emulated check really ran the
    path the exporter's bound protects."""
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
