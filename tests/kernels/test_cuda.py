"""CUDA: the kernels compile with nvcc wherever it is installed; the ops run and match the
reference wherever a GPU is present (skipped otherwise, with the reason)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from lowbit_testing import assert_float_close
from qtool.native import build
from qtool.lowbit import reference as ref

KERNELS = build.kernel_dir()


def cuda_root() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root)
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", sorted(p.name for p in (KERNELS / "cuda").glob("*.cu")))
def test_nvcc_compiles_the_cuda_kernels(source, tmp_path):
    # sm_90: the Hopper GPUs (H100/H200) this project is tested on.
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC,-Wall", f"-I{KERNELS / 'include'}",
         "-c", str(KERNELS / "cuda" / source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.mark.skipif(cuda_root() is None, reason="no CUDA toolkit headers on this machine")
def test_cuda_torch_glue_compiles(tmp_path):
    """ops_cuda.cpp against torch's headers. A CPU-only torch ships c10/cuda without the
    CMake-generated cuda_cmake_macros.h; a CUDA torch has it, so only then is a stand-in added."""
    includes = [f"-I{KERNELS / d}" for d in ("include", "cuda")]
    includes += [f"-isystem{p}" for p in cpp_extension.include_paths()] + [f"-isystem{cuda_root() / 'include'}"]
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        shim = tmp_path / "c10/cuda/impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-isystem{tmp_path}")
    result = subprocess.run(
        [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-Wall", *includes,
         str(KERNELS / "cuda" / "ops_cuda.cpp")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_ops_match_the_reference(qops):
    from test_ops import sample_calls

    assert build.cuda_enabled(), "torch sees a GPU but the CUDA toolkit was not found: the build left CUDA out"
    for name, args in sample_calls().items():
        on_gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        out, expected = getattr(torch.ops.qtool, name)(*on_gpu), ref.OPS[name](*args)
        for o, e in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
            assert o.device.type == "cuda"
            if name == "lowbit_gemm":
                assert_float_close(o.cpu(), e)
            else:
                assert torch.equal(o.cpu(), e), name
