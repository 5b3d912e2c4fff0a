"""The build: cache keys, package data, the JIT entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from torch.utils import cpp_extension

from qtool.native import build

REPO = Path(__file__).resolve().parents[2]


def test_build_kernels_returns_the_cached_library(qops):
    path = Path(build.build_kernels())
    assert path.exists() and path == build.library_path()
    assert path.parent.parent == build.cache_root()


def test_a_cache_hit_loads_the_library(qops):
    # A fresh process that finds the library in the cache (another process published it) must
    # get the ops from build_kernels(), not only the path.
    code = "import torch; from qtool.native import build; build.build_kernels(); print(torch.ops.qtool.pack_int4)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert "qtool.pack_int4" in result.stdout


def test_cuda_flags_carry_the_defines_and_no_host_flags(tmp_path, monkeypatch):
    seen = {}

    def compile_nothing(**kwargs):  # stands in for the compiler: records the flags, "builds" the library
        seen.update(kwargs)
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").write_bytes(b"")

    monkeypatch.setenv("QTOOL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "cuda_enabled", lambda: True)
    monkeypatch.setattr(build, "CFLAGS", build.CFLAGS + ("-fno-plt",))  # one more host flag
    monkeypatch.setattr(cpp_extension, "load", compile_nothing)
    build.build_kernels()
    defines = [f for f in seen["extra_cflags"] if f.startswith("-D")]
    assert "-DQTOOL_WITH_CUDA=1" in defines
    assert seen["extra_cuda_cflags"] == list(build.CUDA_CFLAGS) + defines
    assert seen["extra_cflags"] == list(build.CFLAGS) + defines


def test_build_id_follows_the_sources(tmp_path, monkeypatch):
    copy = tmp_path / "kernels"
    shutil.copytree(build.kernel_dir(), copy)
    monkeypatch.setattr(build, "kernel_dir", lambda: copy)
    before = build.build_id(with_cuda=False)
    assert build.build_id(with_cuda=False) == before
    assert build.build_id(with_cuda=True) != before
    with open(copy / "cpu" / "binary.cpp", "a") as f:
        f.write("// edited\n")
    assert build.build_id(with_cuda=False) != before


def test_every_kernel_source_ships_as_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["qtool._kernels"] == "kernels" and "qtool._kernels" in config["packages"]
    patterns = config["package-data"]["qtool._kernels"]
    kernels = REPO / "kernels"
    sources = {p for p in kernels.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")}
    shipped = {p for pattern in patterns for p in kernels.glob(pattern)}
    assert sources and sources <= shipped
    listed = set(build.GENERIC_SOURCES + build.TRAINING_SOURCES + build.CUDA_SOURCES)
    listed |= {f"cpu/{f}.cpp" for f in build.FAMILIES}
    assert {p.relative_to(kernels).as_posix() for p in sources if p.suffix in (".cpp", ".cu")} == listed
