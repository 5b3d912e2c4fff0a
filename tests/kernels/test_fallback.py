"""Without the compiled extension, torch.ops.qtool.* runs the reference: same names, same numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lowbit_testing import assert_float_close

# Runs in a child process, so that its torch.ops.qtool namespace is the fallback one.
CHILD = """
import sys, torch
from qtool.lowbit import ops
from test_ops import sample_calls
calls = sample_calls()
outputs = {name: getattr(torch.ops.qtool, name)(*args) for name, args in calls.items()}
torch.save({"backend": ops.backend(), "isa": ops.isa(), "outputs": outputs}, sys.argv[1])
"""


def run_child(tmp_path, **env):
    out = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(__file__), env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return torch.load(out), result.stderr


def check_same_numbers(qops, child_outputs):
    from test_ops import sample_calls

    for name, args in sample_calls().items():
        compiled = getattr(torch.ops.qtool, name)(*args)
        fallback = child_outputs[name]
        for c, f in zip(compiled if isinstance(compiled, tuple) else (compiled,),
                        fallback if isinstance(fallback, tuple) else (fallback,)):
            if c.is_floating_point() and name in ("lowbit_gemm", "lowbit_gemm_i8"):
                assert_float_close(c, f)
            else:
                assert torch.equal(c, f), name


def test_failed_build_falls_back_with_one_line_notice(qops, tmp_path):
    # An empty cache and no working compiler: the build fails, the reference takes over.
    child, stderr = run_child(tmp_path, QTOOL_KERNEL_CACHE=str(tmp_path / "cache"), CXX="/bin/false")
    assert child["backend"] == "reference" and child["isa"] == "reference"
    notices = [line for line in stderr.splitlines() if line.startswith("qtool:")]
    assert len(notices) == 1 and "using the pure-PyTorch reference" in notices[0]
    check_same_numbers(qops, child["outputs"])


def test_reference_can_be_forced(qops, tmp_path):
    child, stderr = run_child(tmp_path, QTOOL_KERNELS="reference")
    assert child["backend"] == "reference" and "qtool:" not in stderr
    check_same_numbers(qops, child["outputs"])
