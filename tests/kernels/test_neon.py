"""ARM NEON kernels (aarch64; the NEON sections of kernels/cpu/lowbit.cpp and binary.cpp):
cross-compiled with g++-aarch64-linux-gnu and run under qemu-user (natively on an aarch64
machine), through the torch-free harness in tests/kernels/neon/.

Inputs come from the pure-PyTorch reference (packing, int8 quantization) and the harness's
outputs of every build (scalar C++, baseline NEON, NEON dot product) must equal the reference's
results: exact integers, fp32 activations within float rounding. Correctness only: qemu says
nothing about speed. Skipped, with the reason, where the toolchain or qemu is missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch

from lowbit_testing import assert_float_close
from qtool.lowbit import reference as ref

KERNELS = Path(str(resources.files("qtool._kernels")))
HARNESS = Path(__file__).resolve().parent / "neon"
NATIVE = platform.machine().lower() in ("aarch64", "arm64")
CXX = "g++" if NATIVE else "aarch64-linux-gnu-g++"
QEMU = [] if NATIVE else ["qemu-aarch64"]


def _missing() -> str | None:
    if not (KERNELS / "cpu" / "isa_neon.h").exists():
        return f"the kernel sources are not installed ({KERNELS})"
    if shutil.which(CXX) is None:
        return f"{CXX} is not installed (apt-get install g++-aarch64-linux-gnu qemu-user)"
    if QEMU and shutil.which(QEMU[0]) is None:
        return "qemu-aarch64 is not installed (apt-get install qemu-user)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("neon")
    result = subprocess.run(["sh", str(HARNESS / "build.sh"), str(out), str(KERNELS)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CXX_AARCH64": CXX})
    assert result.returncode == 0, result.stderr
    return out / "harness"


def run(harness: Path, *args: str, cpu: str | None = None) -> str:
    prefix = QEMU + (["-cpu", cpu] if cpu and QEMU else [])
    result = subprocess.run([*prefix, str(harness), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_neon_build_matches_the_scalar_build(harness):
    out = run(harness, "selftest", "300")
    assert " 0 failures" in out and "neon neondot" in out, out


@pytest.mark.skipif(NATIVE, reason="qemu picks the CPU model; a native run has one CPU")
def test_the_library_dispatch_picks_the_best_neon_build(harness):
    """kernels/cpu/dispatch.cpp, as the torch library loads it on aarch64: the dot-product build
    where the CPU has SDOT, baseline NEON where it does not, and QTOOL_KERNEL_ISA forces one."""
    assert run(harness, "dispatch").split() == ["neondot", "neondot,neon,scalar"]
    assert run(harness, "dispatch", cpu="cortex-a53").split() == ["neon", "neon,scalar"]
    forced = subprocess.run([*QEMU, str(harness), "dispatch"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QTOOL_KERNEL_ISA": "neon"})
    assert forced.stdout.split() == ["neon", "neondot,neon,scalar"]


@pytest.mark.skipif(NATIVE, reason="qemu picks the CPU model; a native run has one CPU")
def test_baseline_build_runs_without_the_dot_product(harness):
    # Cortex-A53 (Raspberry Pi 3, many boards) has no SDOT: the baseline build must not use it.
    assert run(harness, "isas", cpu="cortex-a53").split() == ["scalar", "neon"]
    assert " 0 failures" in run(harness, "selftest", "100", cpu="cortex-a53")


# ------------------------------------------------------------------- against the reference
def _codes(N, K, bits, g):
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g)


def _cases():
    """(name, params, inputs, expected outputs, exact) for every op, in the reference's terms."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for M, N, K in [(1, 1, 1), (1, 37, 64), (1, 16, 100), (3, 5, 63), (4, 4, 128), (5, 9, 257), (9, 17, 200),
                    (16, 33, 512), (2, 7, 1000)]:
        for bits in (4, 3):
            for group in [K] + [size for size in (64, 128) if size < K]:
                G = -(-K // group)
                w = (ref.pack_int4 if bits == 4 else ref.pack_int3)(_codes(N, K, bits, g))
                scale = torch.rand(N, G, generator=g) + 0.05
                x = torch.randn(M, K, generator=g)
                xq, xs = ref.quantize_rows_i8(x)
                params = dict(M=M, N=N, K=K, bits=bits, group=group)
                cases.append(("lowbit_i8", params, dict(xq=xq, xs=xs, w=w, scale=scale),
                              dict(out=ref.lowbit_gemm_i8(xq, xs, w, scale, bits, K, group)), G == 1))
                cases.append(("lowbit_f32", params, dict(x=x, w=w, scale=scale),
                              dict(out=ref.lowbit_gemm(x, w, scale, bits, K, group)), False))
        extreme = torch.full((M, K), -128, dtype=torch.int8)  # int16 bound of the baseline dot
        wmax = ref.pack_int4(torch.full((N, K), 7))
        ones = torch.ones(N, 1)
        cases.append(("lowbit_i8", dict(M=M, N=N, K=K, bits=4, group=K), dict(xq=extreme, xs=torch.ones(M), w=wmax,
                      scale=ones), dict(out=ref.lowbit_gemm_i8(extreme, torch.ones(M), wmax, ones, 4, K, K)), True))
    for M, K in [(1, 1), (3, 7), (5, 64), (4, 100), (2, 1000)]:
        x = torch.randn(M, K, generator=g)
        x[:, ::5] = 0.0  # sign(0) = +1
        xq, xs = ref.quantize_rows_i8(x)
        cases.append(("quantize", dict(M=M, K=K), dict(x=x), dict(q=xq, s=xs), True))
        cases.append(("pack_binary", dict(M=M, K=K), dict(x=x), dict(out=ref.pack_binary(x)), True))
    for M, N, K in [(1, 1, 1), (1, 8, 64), (2, 9, 65), (7, 16, 144), (1, 5, 4100), (13, 17, 577), (50, 33, 130),
                    (97, 40, 1000), (9, 3, 1601)]:
        a, w = ref.pack_binary(torch.randn(M, K, generator=g)), ref.pack_binary(torch.randn(N, K, generator=g))
        scale = torch.rand(N, generator=g)
        cases.append(("binary_gemm", dict(M=M, N=N, K=K), dict(a=a, w=w, scale=scale),
                      dict(out=ref.binary_gemm(a, w, K, scale)), True))
    for N, C, H, W, O, k, s, p, d in [(2, 3, 9, 9, 5, 3, 1, 1, 1), (1, 16, 8, 8, 16, 3, 1, 1, 1),
                                      (2, 24, 7, 6, 9, 3, 2, 1, 1), (1, 64, 6, 6, 8, 3, 1, 1, 1),
                                      (1, 72, 5, 5, 4, 3, 1, 2, 2), (1, 128, 4, 4, 12, 1, 1, 0, 1),
                                      (1, 8, 10, 10, 3, 3, 2, 0, 2)]:
        x = torch.randn(N, C, H, W, generator=g)
        weight = torch.randn(O, C, k, k, generator=g)
        w = ref.pack_binary(ref.binary_weight_order(weight).contiguous())
        scale = torch.rand(O, generator=g)
        expected = ref.binary_conv2d(x, w, C, [k, k], [s, s], [p, p], [d, d], scale).permute(0, 2, 3, 1)
        cases.append(("binary_conv", dict(N=N, C=C, H=H, W=W, O=O, kh=k, kw=k, s=s, p=p, d=d),
                      dict(x=x, w=w, scale=scale), dict(out=expected), True))
    return cases


def test_neon_kernels_match_the_reference(harness, tmp_path):
    cases = _cases()
    names = []
    for i, (op, params, inputs, _, _) in enumerate(cases):
        folder = tmp_path / f"case{i:03d}"
        folder.mkdir()
        (folder / "case.txt").write_text(" ".join([f"op={op}"] + [f"{k}={v}" for k, v in params.items()]) + "\n")
        for key, tensor in inputs.items():
            tensor.contiguous().numpy().tofile(folder / f"{key}.bin")
        names.append(folder.name)
    (tmp_path / "cases.txt").write_text("\n".join(names) + "\n")
    run(harness, "cases", str(tmp_path))
    isas = run(harness, "isas").split()
    assert {"scalar", "neon", "neondot"} <= set(isas)
    for name, (op, params, _, expected, exact) in zip(names, cases):
        for isa in isas:
            for key, want in expected.items():
                data = (tmp_path / name / f"{key}_{isa}.bin").read_bytes()
                got = torch.frombuffer(bytearray(data), dtype=want.dtype).reshape(want.shape)
                where = f"{op} {params} {key} on {isa}"
                if exact:
                    assert torch.equal(got, want.contiguous()), where
                else:
                    assert_float_close(got, want.contiguous())


@pytest.mark.skipif(NATIVE, reason="on an aarch64 machine the library itself builds and loads (test_build.py)")
def test_the_torch_library_sources_compile_for_aarch64():
    """Every translation unit of the torch op library, as qtool.native.build compiles it on an
    aarch64 machine (generic sources plus one wrapper per kernel family and NEON ISA), passes
    the cross compiler: syntax and types only, no link (torch is x86 here)."""
    import sysconfig

    from torch.utils import cpp_extension

    from qtool.native.build import CFLAGS, GENERIC_SOURCES, TRAINING_SOURCES

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    includes += [f"-I{KERNELS / 'include'}", f"-I{KERNELS / 'cpu'}"]

    units = [([], KERNELS / s) for s in GENERIC_SOURCES + TRAINING_SOURCES]
    units += [([f"-DQTOOL_ISA_{isa.upper()}=1"], KERNELS / "cpu" / f"{family}.cpp")
              for family in ("binary", "lowbit") for isa in ("neondot", "neon")]
    for defines, source in units:
        result = subprocess.run([CXX, "-std=c++20", "-fsyntax-only", *CFLAGS, *defines, *includes, str(source)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{source.name} {defines}: {result.stderr[-2000:]}"
