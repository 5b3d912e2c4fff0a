"""JIT build of the one qtool op library (``torch.ops.qtool``), cached on disk.

The sources ship as package data (``kernels/`` installs as ``qtool._kernels``), so a wheel can
build them too; nothing is compiled while pip installs the package. The first use compiles
(about a minute on two cores); later uses find the library in the cache and only load it.

Cache: ``$QTOOL_KERNEL_CACHE``, else ``$QTOOL_CACHE/kernels``, else ``~/.cache/qtool/kernels``;
one folder per hash of the sources, the flags, the compiler, torch and Python, so a change to
any of them rebuilds.

Every low-bit CPU kernel family (``binary.cpp``, ``lowbit.cpp``) is compiled once per ISA through
a generated two-line wrapper that defines the ISA macro and includes the family; the library
picks one build at load time (``cpu/dispatch.cpp``). The training ops (``fake_quant.cpp``,
``sign_estimator.cpp``) are compiled once, their loops cloned per ISA by the compiler
(``cpu/target_clones.h``). CUDA sources join the build when torch has CUDA and a CUDA toolkit is
found.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

NAME = "qtool_kernels"
FAMILIES = ("binary", "lowbit")
GENERIC_SOURCES = ("registration.cpp", "cpu/ops_cpu.cpp", "cpu/dispatch.cpp", "cpu/layout.cpp", "cpu/im2col.cpp",
                   "cpu/fused_layer.cpp")
TRAINING_SOURCES = ("cpu/fake_quant.cpp", "cpu/sign_estimator.cpp")
CUDA_SOURCES = ("cuda/kernels.cu", "cuda/ops_cuda.cpp")
# torch adds -std=c++20. The last three change no result and let the `#pragma omp simd` loops
# (reductions, libmvec calls) vectorize; -ffast-math would change results, so it is never used.
CFLAGS = ("-O3", "-Wall", "-Wno-unused-function", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math")
CUDA_CFLAGS = ("-O3", "--expt-relaxed-constexpr")


def kernel_dir() -> Path:
    """The folder holding the C++/CUDA sources (the repository's kernels/ in a checkout)."""
    return Path(str(resources.files("qtool._kernels")))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def isas() -> tuple[str, ...]:
    """The ISA builds of each kernel family, best first (kernels/cpu/dispatch.cpp picks at load)."""
    if is_x86():
        return ("avx512", "avx2", "scalar")
    if is_aarch64():
        return ("neondot", "neon", "scalar")
    return ("scalar",)


def cuda_enabled() -> bool:
    import torch
    from torch.utils import cpp_extension

    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def cache_root() -> Path:
    if os.environ.get("QTOOL_KERNEL_CACHE"):
        return Path(os.environ["QTOOL_KERNEL_CACHE"]).expanduser()
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool")).expanduser() / "kernels"


def _compiler_identity() -> str:
    """The compiler torch will run, as its resolved path, size and mtime: cheaper than running
    it on every import, and it changes when the compiler is upgraded."""
    compiler = os.environ.get("CXX", "c++")
    path = shutil.which(compiler)
    if path is None:
        return compiler
    real = os.path.realpath(path)
    stat = os.stat(real)
    return f"{compiler}={real}:{stat.st_size}:{stat.st_mtime_ns}"


def _defines(with_cuda: bool) -> list[str]:
    """Macros every translation unit sees, host and CUDA alike."""
    defines = []
    if is_x86():
        defines.append("-DQTOOL_WITH_X86=1")
    if with_cuda:
        defines.append("-DQTOOL_WITH_CUDA=1")
    return defines


def host_flags(with_cuda: bool) -> list[str]:
    return list(CFLAGS) + _defines(with_cuda)


def cuda_flags(with_cuda: bool) -> list[str]:
    return list(CUDA_CFLAGS) + _defines(with_cuda)


def linker_flags() -> list[str]:
    """``-lmvec`` where sign_estimator.cpp calls glibc's vector exp/log (x86-64 with glibc)."""
    glibc_x86_64 = platform.machine().lower() in ("x86_64", "amd64") and platform.libc_ver()[0] == "glibc"
    return ["-lmvec"] if glibc_x86_64 else []


def build_id(with_cuda: bool | None = None) -> str:
    """Hash of everything the compiled library depends on."""
    import torch

    with_cuda = cuda_enabled() if with_cuda is None else with_cuda
    digest = hashlib.sha256()
    root = kernel_dir()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    for part in (host_flags(with_cuda), cuda_flags(with_cuda), linker_flags(), isas(), torch.__version__,
                 sys.version, platform.machine(), _compiler_identity()):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def library_path(with_cuda: bool | None = None) -> Path:
    return cache_root() / build_id(with_cuda) / f"{NAME}.so"


def _wrappers(folder: Path) -> list[str]:
    """One translation unit per (kernel family, ISA): define the ISA, include the family."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for family in FAMILIES:
        for isa in isas():
            path = folder / f"{family}_{isa}.cpp"
            define = "" if isa == "scalar" else f"#define QTOOL_ISA_{isa.upper()} 1\n"
            path.write_text(f'{define}#include "{(kernel_dir() / "cpu" / family).as_posix()}.cpp"\n')
            sources.append(str(path))
    return sources


_loaded: str | None = None  # loading a second copy would register every op twice


def build_kernels(verbose: bool = False) -> str:
    """Load the library into this process, compiling it into the cache first unless it is
    there; return its path. Raises on a failed build or load.

    Concurrent builds are safe: each compiles in its own folder and the first to finish
    publishes its result with an atomic rename (the others keep the copy they loaded).
    """
    global _loaded
    if _loaded is None:
        with_cuda = cuda_enabled()
        target = library_path(with_cuda)
        if target.exists():
            import torch

            torch.ops.load_library(str(target))
        else:
            _compile(target, with_cuda, verbose)
        _loaded = str(target)
    return _loaded


def _compile(target: Path, with_cuda: bool, verbose: bool) -> None:
    """Compile into a private folder (torch's JIT loader loads the result from there), then
    publish that folder as ``target``'s."""
    from torch.utils import cpp_extension

    root = kernel_dir()
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{target.parent.name}.", dir=target.parent.parent))
    try:
        sources = [str(root / s) for s in GENERIC_SOURCES + TRAINING_SOURCES] + _wrappers(work / "gen")
        if with_cuda:
            sources += [str(root / s) for s in CUDA_SOURCES]
        cpp_extension.load(
            name=NAME,
            sources=sources,
            extra_cflags=host_flags(with_cuda),
            extra_cuda_cflags=cuda_flags(with_cuda),
            extra_ldflags=linker_flags(),
            extra_include_paths=[str(root / "include"), str(root / "cpu"), str(root / "cuda")],
            build_directory=str(work),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
        try:
            work.rename(target.parent)
        except OSError:  # another process published the same build first
            pass
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    if not target.exists():
        raise RuntimeError(f"the kernel build finished but {target} is missing")


if __name__ == "__main__":
    print(build_kernels(verbose="-v" in sys.argv))
