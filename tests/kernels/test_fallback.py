"""Without the compiled library, torch.ops.qtool.* runs the reference: same names, same numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lowbit_testing import assert_float_close
from qtool.native import library

# Float results a few ulps from the reference's, not bit for bit: sums taken in another order
# (the GEMMs, LSQ's step-size gradient) and vectorized exp/log (ReSTE's power).
WITHIN_ULPS = {"lowbit_gemm", "lowbit_gemm_i8", "lsq_fake_quant_backward", "reste_sign_backward"}

# Runs in a child process, so that its torch.ops.qtool namespace is the fallback one.
CHILD = """
import sys, torch
from qtool.lowbit import ops
from lowbit_testing import register_every_op_family
from test_ops import sample_calls
register_every_op_family()
calls = sample_calls()
outputs = {name: getattr(torch.ops.qtool, name)(*args) for name, args in calls.items()}
torch.save({"backend": ops.backend(), "isa": ops.isa(), "outputs": outputs}, sys.argv[1])
"""


def run_child(tmp_path, code=CHILD, **env):
    """Run ``code`` (which saves its results to ``sys.argv[1]``) in a child process."""
    out = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600,
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
            if c.is_floating_point() and name in WITHIN_ULPS:
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


CHILD_OPCHECK = """
import sys, torch
from qtool.native import library
from lowbit_testing import register_every_op_family
from test_ops import sample_calls
register_every_op_family()
for name, args in sample_calls().items():
    torch.library.opcheck(getattr(torch.ops.qtool, name).default, args)
torch.save({"backend": library.load(), "checked": sorted(sample_calls())}, sys.argv[1])
"""


def test_opcheck_passes_on_the_reference_backend(qops, tmp_path):
    child, _ = run_child(tmp_path, CHILD_OPCHECK, QTOOL_KERNELS="reference")
    assert child["backend"] == "reference" and set(child["checked"]) == set(library.SCHEMAS)
