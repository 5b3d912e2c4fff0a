"""An aarch64 Python with numpy and onnxruntime, for running onnxruntime's ARM kernels under
qemu-aarch64 on an x86 machine (``qtool.emulated_cpu``'s ARM CPUs).

The interpreter and the C libraries are Debian 12's arm64 packages, unpacked with ``dpkg -x``
(nothing is installed); numpy and onnxruntime are PyPI's manylinux aarch64 wheels at the versions
this machine runs, so both CPUs run the same onnxruntime release. Set-up, once::

    dpkg --add-architecture arm64 && apt-get update    # as root: lets apt fetch arm64 packages
    python -m qtool.arm_sysroot                         # ~45 MB into ~/.cache/qtool/arm64

Torch-free, like ``qtool.emulated_cpu``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qtool.errors import QtoolError

PYTHON = "3.11"  # Debian 12's; the wheels are fetched for it
# The interpreter and what it, numpy's bundled OpenBLAS and onnxruntime link against (Debian 12 names).
PACKAGES = (
    "libc6", "libgcc-s1", "libstdc++6", f"python{PYTHON}-minimal", f"libpython{PYTHON}-minimal",
    f"libpython{PYTHON}-stdlib", "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libcrypt1",
    "libuuid1", "libsqlite3-0", "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3",
    "libcom-err2", "libkrb5support0", "libkeyutils1", "libdb5.3", "libncursesw6", "libtinfo6", "libreadline8",
)
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
SETUP = "set it up with `python -m qtool.arm_sysroot` (first, as root: dpkg --add-architecture arm64 && apt-get update)"


@dataclass(frozen=True)
class Sysroot:
    root: Path    # the unpacked packages: qemu's -L prefix for the dynamic loader and libraries
    site: Path    # numpy, onnxruntime and their dependencies for the aarch64 Python
    python: Path  # the interpreter, inside root


def default_dir() -> Path:
    if os.environ.get("QTOOL_ARM_SYSROOT"):
        return Path(os.environ["QTOOL_ARM_SYSROOT"]).expanduser()
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool")).expanduser() / "arm64"


def at(folder: Path) -> Sysroot:
    return Sysroot(folder / "root", folder / "site", folder / "root" / "usr" / "bin" / f"python{PYTHON}")


def find(folder: Path | None = None) -> Sysroot:
    """The sysroot in ``folder`` (default ``default_dir()``), or a one-line error saying how to make it."""
    sysroot = at(folder or default_dir())
    if not (sysroot.python.is_file() and (sysroot.site / "onnxruntime").is_dir()):
        raise QtoolError(f"emulating an ARM CPU needs an aarch64 Python with onnxruntime in {sysroot.root.parent}; {SETUP}")
    return sysroot


def _run(command: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise QtoolError(f"{what} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


def _unpack_packages(work: Path, root: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise QtoolError("building the ARM sysroot needs Debian's apt-get and dpkg")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in foreign:
        raise QtoolError("apt cannot fetch arm64 packages yet; as root: dpkg --add-architecture arm64 && apt-get update")
    debs = work / "debs"
    debs.mkdir()
    root.mkdir(parents=True)  # dpkg -x creates the last folder only
    _run(["apt-get", "download", "-qq", *(f"{name}:arm64" for name in PACKAGES)], debs, "apt-get download")
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)], debs, f"dpkg -x {deb.name}")


def _unpack_wheels(work: Path, site: Path) -> None:
    """numpy and onnxruntime at this machine's versions (and what onnxruntime requires), for aarch64."""
    try:
        pins = [f"{name}=={metadata.version(name)}" for name in ("onnxruntime", "numpy")]
    except metadata.PackageNotFoundError as exc:
        raise QtoolError(f"{exc.name} is not installed here; the ARM sysroot takes its version from this machine") from None
    wheels = work / "wheels"
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *platforms, "--python-version", PYTHON,
          "--implementation", "cp", "-d", str(wheels), *pins], work, "pip download of the aarch64 wheels")
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)


def build(folder: Path | None = None) -> Sysroot:
    """Fetch and unpack everything into ``folder`` (replaced only once it is complete)."""
    folder = folder or default_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".arm64-", dir=folder.parent) as scratch:
        work = Path(scratch)
        staged = at(work / "sysroot")
        _unpack_packages(work, staged.root)
        _unpack_wheels(work, staged.site)
        if not staged.python.is_file():
            raise QtoolError(f"the arm64 packages held no {staged.python.name}")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work / "sysroot", folder)
    return at(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help=f"where to put it (default {default_dir()})")
    args = parser.parse_args(argv)
    try:
        sysroot = build(args.dest)
    except QtoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"aarch64 Python with onnxruntime: {sysroot.python} (site {sysroot.site})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
