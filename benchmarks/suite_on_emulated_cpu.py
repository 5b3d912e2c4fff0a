"""Run tests as an AVX2-only CPU runs them, from any x86_64 machine.

pytest runs under ``qemu-x86_64 -cpu EPYC-Rome``: AVX2, no AVX-512, no VNNI. So do the
``sys.executable`` child processes the tests start, because qemu-user does not follow exec.
Kernel dispatch (``__builtin_cpu_supports``), torch and onnxruntime all see that CPU's CPUID:

    python benchmarks/suite_on_emulated_cpu.py -q tests/kernels tests/test_export.py

This is correctness only. Emulation is 10-20x slower: the command above took 33 min on two busy
cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

from qtool import emulated_cpu

CPU = "avx2"
MARK = "QTOOL_EMULATED_CPU"  # set once the process runs under qemu


def emulate_children(qemu: str, model: str) -> None:
    """Put qemu in front of every child that runs this Python."""
    plain_run = subprocess.run

    def run(command, *args, **kwargs):
        if isinstance(command, (list, tuple)) and command and command[0] == sys.executable:
            command = [qemu, "-cpu", model, *command]
        return plain_run(command, *args, **kwargs)

    subprocess.run = run


def main(argv: list[str]) -> int:
    qemu, model = emulated_cpu.emulator(), emulated_cpu.CPUS[CPU].qemu_model
    if MARK not in os.environ:
        print(f"running pytest on the {emulated_cpu.describe(CPU)}", flush=True)
        os.execve(qemu, [qemu, "-cpu", model, sys.executable, __file__, *argv], {**os.environ, MARK: model})
    import pytest

    emulate_children(qemu, model)
    return pytest.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
