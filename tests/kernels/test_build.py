"""The build: cache keys, package data, the JIT entry point."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from qtool.lowbit import build
from qtool.quant import binary, fake_quant

REPO = Path(__file__).resolve().parents[2]


def test_build_kernels_returns_the_cached_library(qops):
    path = Path(build.build_kernels())
    assert path.exists() and path == build.library_path()
    assert path.parent.parent == build.cache_root()


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
    listed = set(build.GENERIC_SOURCES) | set(build.CUDA_SOURCES) | {f"cpu/{f}.cpp" for f in build.FAMILIES}
    listed |= set(fake_quant.SOURCES) | set(binary.SOURCES)  # the training ops, built by qtool.extensions
    assert {p.relative_to(kernels).as_posix() for p in sources if p.suffix in (".cpp", ".cu")} == listed
