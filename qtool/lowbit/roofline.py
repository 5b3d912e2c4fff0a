"""The roofline of ``qtool bench --kernels``: peaks and bandwidths of the reference VM, and the
row that puts a timed kernel against them.

The peaks and bandwidths were measured once, on the reference VM (``ROOFLINE_SOURCE``), not on
the machine at hand: elsewhere the fraction only says how far a kernel is from what that VM
could do.
"""

from __future__ import annotations

ROOFLINE_SOURCE = ("peaks and bandwidths measured on the reference VM (Intel Xeon, 2 vCPU, AVX-512 VNNI; "
                   "../shared/docs/research/research-kernels.md §4.1), not on this machine")
ROOFLINE_LABEL = "roofline (ref. VM)"
# Per-core instruction-mix peaks, in G ops/s (binary: G binary MACs/s); bandwidths in GB/s for
# 1 and 2 threads. Midpoints of the ranges measured on the reference VM.
PEAK_PER_CORE = {
    "fp32": 150.0,            # vfmadd231ps zmm: 140-163 GFLOP/s
    "fp32_avx2": 70.0,        # vfmadd231ps ymm: 62-81
    "int8_avx512": 617.0,     # vpdpbusd zmm: 605-630 GOPS
    "int8_avx2": 133.0,       # vpmaddubsw + vpmaddwd + vpaddd: 123-143
    "binary_avx512": 840.0,   # vpxorq + vpopcntq + vpaddq: 790-890 G binMAC/s
    "binary_avx2": 220.0,     # xor + nibble-LUT vpshufb: 200-240
    "binary_scalar": 150.0,   # popcnt r64: 145-160
}
DRAM_GBPS = {1: 13.3, 2: 24.2}   # 128 MiB - 2 GiB streaming reads
CACHE_GBPS = {1: 24.0, 2: 44.0}  # 16 MiB working set (LLC)
ROTATE_BYTES = 320 * 2**20       # more than the 300 MB L3 the reference VM reports


def machine() -> dict:
    """The roofline's numbers, for the JSON document."""
    return {"measured_on": ROOFLINE_SOURCE, "peak_per_core": PEAK_PER_CORE, "dram_gbps": DRAM_GBPS,
            "cache_gbps": CACHE_GBPS}


def _peak(kind: str, isa: str, threads: int) -> float:
    key = {"binary": f"binary_{isa}", "int8": f"int8_{'avx512' if isa == 'avx512' else 'avx2'}",
           "fp32": "fp32" if isa == "avx512" else "fp32_avx2"}[kind]
    return PEAK_PER_CORE.get(key, PEAK_PER_CORE["fp32_avx2"]) * threads


def row(name, shape, ours, fp32, isa, threads, ops_count, bytes_moved, kind, rotated, unit="GOP/s", **extra) -> dict:
    """One row of ``{"kernels": [...]}``: times, throughput, bandwidth and the roofline fraction
    (compute peak of ``kind`` on ``isa``, or DRAM/cache bandwidth times arithmetic intensity)."""
    achieved = ops_count / (ours * 1e-3) / 1e9
    bandwidth = (DRAM_GBPS if rotated else CACHE_GBPS)[min(threads, 2)] * (threads / min(threads, 2))
    roof = min(_peak(kind, isa, threads), ops_count / bytes_moved * bandwidth)
    return {"name": name, "shape": list(shape), "ours_ms": round(ours, 4), "fp32_ms": round(fp32, 4),
            "speedup": round(fp32 / ours, 2), "isa": isa, "threads": threads, "gops": round(achieved, 1),
            "unit": unit, "gbps": round(bytes_moved / (ours * 1e-3) / 1e9, 2),
            "roofline_fraction": round(achieved / roof, 3), "roof": f"{kind}/{'dram' if rotated else 'cache'}",
            **extra}
