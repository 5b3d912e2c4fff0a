"""``qtool bench --kernels``: the kernels against fp32 PyTorch at real layer shapes.

The one place that times kernels. Method: same process, same thread count for both sides
(``torch.set_num_threads`` governs torch's BLAS and our ``at::parallel_for`` alike), a
correctness check before timing, warm-up, then the two sides timed alternately
(``qtool.timing``: a busy neighbour slows both) and the median of each. Memory-bound
linears rotate over more distinct weight copies than the last-level cache holds (> 300 MB
per side), so each call streams its weights from DRAM, as in a real model.

Each row reports ours_ms, fp32_ms, speedup, the throughput (GOP/s, or G binary MAC/s for
XNOR kernels), the effective bandwidth and a roofline fraction against the reference VM's
peaks (``qtool.lowbit.roofline``). The end-to-end rows come from ``qtool.lowbit.bench_model``;
tables and Markdown from ``qtool.lowbit.bench_cli``; ``benchmarks/bench_kernels.py`` is the
script that writes ``docs/BENCHMARKS_kernels.json``.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
import torch.nn.functional as F

from qtool.atomic import write_text_atomic
from qtool.errors import QtoolError
from qtool.lowbit import ops, roofline
from qtool.lowbit.bench_model import bench_end_to_end
from qtool.lowbit.roofline import ROTATE_BYTES
from qtool.timing import interleaved_ms, medians

WARMUP = 3


def paired_ms(ours: Callable[[], object], fp32: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians of the two sides timed alternately after ``WARMUP`` rounds."""
    times = medians(interleaved_ms({"ours": ours, "fp32": fp32}, repeats, WARMUP))
    return times["ours"], times["fp32"]


class Rotation:
    """Distinct copies of some tensors, totalling at least ``ROTATE_BYTES``; ``next()`` returns
    the following copy, so consecutive calls never find their data in cache."""

    def __init__(self, *tensors: torch.Tensor, min_bytes: int = ROTATE_BYTES):
        size = sum(t.numel() * t.element_size() for t in tensors)
        count = max(2, -(-min_bytes // max(size, 1)))
        self.copies = [tuple(t.clone() for t in tensors) for _ in range(count)]
        self.index = 0

    def next(self):
        self.index = (self.index + 1) % len(self.copies)
        return self.copies[self.index]


# ------------------------------------------------------------------------------- shapes
# Convs as GEMM: M = batch * output pixels, K = C * 3 * 3, N = output channels.
RESNET20_GEMMS = [(8 * 32 * 32, 144, 16), (8 * 16 * 16, 288, 32), (8 * 8 * 8, 576, 64)]  # CIFAR, batch 8
RESNET18_GEMMS = [(56 * 56, 576, 64), (28 * 28, 1152, 128), (14 * 14, 2304, 256), (7 * 7, 4608, 512)]  # 224, batch 1
# Convs: [N, C, H, W, O, kh, kw]
RESNET20_CONVS = [(8, 16, 32, 32, 16, 3, 3), (8, 32, 16, 16, 32, 3, 3), (8, 64, 8, 8, 64, 3, 3)]
RESNET18_CONVS = [(1, 64, 56, 56, 64, 3, 3), (1, 128, 28, 28, 128, 3, 3), (1, 256, 14, 14, 256, 3, 3),
                  (1, 512, 7, 7, 512, 3, 3)]
LINEAR_BATCHES = (1, 16, 64)


def bench_binary_gemm(M, K, N, threads, isa, repeats, fp32_input=False):
    """Weights packed ahead, as in a model. Activations packed too (the GEMM itself, what a
    binary network whose layers emit bits feeds it), or fp32 binarized and packed inside the
    timing (``fp32_input``: memory-bound on reading the fp32 activations when M * K is large)."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    a_bits, w_bits, w_t = torch.ops.qtool.pack_binary(a), torch.ops.qtool.pack_binary(w), w.t().contiguous()
    scale = torch.rand(N, generator=g)
    if fp32_input:
        ours_fn = lambda: torch.ops.qtool.binary_gemm(torch.ops.qtool.pack_binary(a), w_bits, K, scale)  # noqa: E731
    else:
        ours_fn = lambda: torch.ops.qtool.binary_gemm(a_bits, w_bits, K, scale)  # noqa: E731
    expected = (torch.where(a >= 0, 1.0, -1.0) @ torch.where(w >= 0, 1.0, -1.0).T) * scale
    assert torch.equal(ours_fn(), expected), "binary_gemm disagrees with the reference"
    ours, fp32 = paired_ms(ours_fn, lambda: torch.matmul(a, w_t), repeats)
    moved = M * K * (4 if fp32_input else 1 / 8) + N * -(-K // 64) * 8 + M * N * 4
    name = "binary_gemm_fp32_input" if fp32_input else "binary_gemm"
    activations = "fp32, binarized and packed inside the timing" if fp32_input else "packed bits"
    return roofline.row(name, (M, K, N), ours, fp32, isa, threads, M * N * K, moved, "binary", False,
                        unit="G binMAC/s", activations=activations)


def bench_binary_conv(N, C, H, W, O, kh, kw, threads, isa, repeats):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(N, C, H, W, generator=g), torch.randn(O, C, kh, kw, generator=g)
    w_bits, scale = ops.pack_conv_weight_binary(weight), torch.rand(O, generator=g)
    ours_fn = lambda: torch.ops.qtool.binary_conv2d(x, w_bits, C, [kh, kw], [1, 1], [1, 1], [1, 1], scale)  # noqa: E731
    signs = torch.where(weight >= 0, 1.0, -1.0)
    assert torch.equal(ours_fn(), F.conv2d(torch.where(x >= 0, 1.0, -1.0), signs, padding=1) * scale.view(1, -1, 1, 1))
    ours, fp32 = paired_ms(ours_fn, lambda: F.conv2d(x, weight, padding=1), repeats)
    macs = N * H * W * O * C * kh * kw
    moved = x.numel() * 4 + O * -(-C * kh * kw // 64) * 8 + N * O * H * W * 4
    note = "input NCHW fp32, output channels-last; incl. binarizing the input"
    return roofline.row("binary_conv2d", (N, C, H, W, O, kh, kw), ours, fp32, isa, threads, macs, moved, "binary",
                        False, unit="G binMAC/s", note=note)


def bench_lowbit_linear(M, K, N, bits, int8, threads, isa, repeats, group_size=None):
    """Weights rotated over > 300 MB on both sides; int8 rows include the dynamic per-row
    quantization of the fp32 activations."""
    g = torch.Generator().manual_seed(0)
    group_size = group_size or K
    codes = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (N, K), generator=g)
    scale = torch.rand(N, -(-K // group_size), generator=g) * 0.01
    packed = ops.pack_weights(codes, bits)
    weights = (codes.float() * scale.repeat_interleave(group_size, 1)[:, :K])
    x = torch.randn(M, K, generator=g)
    ours_rot, fp32_rot = Rotation(packed), Rotation(weights)

    def ours_fn():
        (w,) = ours_rot.next()
        if int8:
            q, s = torch.ops.qtool.quantize_rows_i8(x)
            return torch.ops.qtool.lowbit_gemm_i8(q, s, w, scale, bits, K, group_size)
        return torch.ops.qtool.lowbit_gemm(x, w, scale, bits, K, group_size)

    def fp32_fn():
        (w,) = fp32_rot.next()
        return torch.matmul(x, w.t())

    exact = torch.ops.qtool.lowbit_gemm(x, packed, scale, bits, K, group_size)
    torch.testing.assert_close(exact, x @ weights.T, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    ours, fp32 = paired_ms(ours_fn, fp32_fn, repeats)
    name = f"int{bits}_gemm" + ("_i8" if int8 else "") + (f"_g{group_size}" if group_size != K else "")
    moved = packed.numel() + scale.numel() * 4 + M * K * (5 if int8 else 4) + M * N * 4
    return roofline.row(name, (M, K, N), ours, fp32, isa, threads, 2 * M * N * K, moved, "int8" if int8 else "fp32",
                        True, activations="int8 (dynamic per row)" if int8 else "fp32")


# fp32 as an AVX2-only machine runs it: MKL and oneDNN limited to AVX2, in a child process
# (the limits only take effect before the libraries initialise).
AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
_AVX2_CHILD = """
import json, sys, torch
import torch.nn.functional as F
from qtool.timing import interleaved_ms, medians
cases, threads, repeats = json.loads(sys.argv[1])
median_ms = lambda fn: medians(interleaved_ms({"fp32": fn}, repeats, 3))["fp32"]
torch.set_num_threads(threads)
out = []
for kind, shape in cases:
    g = torch.Generator().manual_seed(0)
    if kind == "gemm":
        M, K, N = shape
        a, w_t = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        out.append(median_ms(lambda: torch.matmul(a, w_t)))
    else:
        n, c, h, w, o, kh, kw = shape
        x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, kh, kw, generator=g)
        out.append(median_ms(lambda: F.conv2d(x, weight, padding=1)))
print(json.dumps(out))
"""


def avx2_fp32_ms(cases: list[tuple[str, list[int]]], threads: int, repeats: int) -> list[float | None]:
    """fp32 times of ("gemm", [M, K, N]) / ("conv", [N, C, H, W, O, kh, kw]) cases on AVX2 only."""
    import os
    import subprocess
    import sys

    if not cases:
        return []
    result = subprocess.run([sys.executable, "-c", _AVX2_CHILD, json.dumps([cases, threads, repeats])],
                            capture_output=True, text=True, env={**os.environ, **AVX2_ENV}, timeout=1800)
    if result.returncode != 0:
        return [None] * len(cases)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- driver
def _plan(quick: bool, simd_isas: list[str]):
    """(label, function, args, ISAs) for every row."""
    best = simd_isas[:1]
    if quick:
        return [
            ("binary_gemm", bench_binary_gemm, RESNET18_GEMMS[1], simd_isas),
            ("binary_gemm_fp32_input", bench_binary_gemm, RESNET18_GEMMS[1], best, {"fp32_input": True}),
            ("binary_conv2d", bench_binary_conv, RESNET20_CONVS[0], best),
            ("int4_gemm", bench_lowbit_linear, (1, 4096, 4096, 4, False), best),
            ("int4_gemm_i8", bench_lowbit_linear, (1, 4096, 4096, 4, True), best),
            ("int4_gemm_i8", bench_lowbit_linear, (64, 4096, 4096, 4, True), best),
            ("e2e", bench_end_to_end, (1,), best),
        ]
    gemms = RESNET20_GEMMS + RESNET18_GEMMS + [(m, 4096, 4096) for m in LINEAR_BATCHES]
    plan = [("binary_gemm", bench_binary_gemm, s, simd_isas) for s in gemms]
    plan += [("binary_gemm_fp32_input", bench_binary_gemm, s, best, {"fp32_input": True}) for s in gemms]
    plan += [("binary_conv2d", bench_binary_conv, s, simd_isas) for s in RESNET20_CONVS + RESNET18_CONVS]
    for m in LINEAR_BATCHES:
        for bits in (4, 3):
            plan.append((f"int{bits}_gemm", bench_lowbit_linear, (m, 4096, 4096, bits, False), best))
            plan.append((f"int{bits}_gemm_i8", bench_lowbit_linear, (m, 4096, 4096, bits, True), simd_isas))
    plan += [("int4_gemm_i8_g128", bench_lowbit_linear, (m, 4096, 4096, 4, True), best, {"group_size": 128})
             for m in (1, 64)]
    plan += [("e2e", bench_end_to_end, (b,), best) for b in (1, 32)]
    return plan


def run_kernel_benchmarks(threads: list[int], quick: bool, json_path: str | None,
                          progress: Callable[[dict], None] | None = None) -> dict:
    """Run the kernel benchmarks at each thread count; return (and optionally write) the
    contract's ``{"kernels": [...]}`` JSON, with extra keys per row."""
    if ops.backend() != "extension":
        raise QtoolError("the compiled kernels are not available (see `qtool build-kernels`); nothing to bench")
    simd = [name for name in ops.supported_isas() if name != "scalar"] or ops.supported_isas()
    repeats = 5 if quick else 15
    rows, previous_threads, previous_isa = [], torch.get_num_threads(), ops.isa()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for entry in _plan(quick, simd):
                label, fn, args, isas = entry[:4]
                kwargs = entry[4] if len(entry) > 4 else {}
                for isa in isas:
                    ops.set_isa(isa)
                    with torch.no_grad():
                        row = fn(*args, threads=t, isa=isa, repeats=repeats, **kwargs)
                    if isa == "avx2" and row["name"] in ("binary_gemm", "binary_conv2d"):
                        kind = "gemm" if row["name"] == "binary_gemm" else "conv"
                        (avx2_ms,) = avx2_fp32_ms([(kind, row["shape"])], t, repeats)
                        if avx2_ms:
                            row["fp32_avx2_ms"] = round(avx2_ms, 4)
                            row["speedup_vs_avx2_fp32"] = round(avx2_ms / row["ours_ms"], 2)
                    rows.append(row)
                    if progress:
                        progress(row)
    finally:
        torch.set_num_threads(previous_threads)
        ops.set_isa(previous_isa)
    result = {"kernels": rows, "machine": {"torch": torch.__version__, "supported_isas": ops.supported_isas(),
                                           "roofline": roofline.machine()},
              "method": "medians of alternating runs (ours, fp32, ...) after warm-up, same process and threads; "
                        "linears rotate "
                        f"weights over > {ROTATE_BYTES >> 20} MiB"}
    if json_path:
        write_text_atomic(json_path, json.dumps(result, indent=1))
    return result
