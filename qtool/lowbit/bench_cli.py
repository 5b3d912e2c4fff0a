"""The torch half of ``qtool bench``: ``--kernels`` (the kernel suite on real layer shapes) and
``CKPT.pt --backend kernels`` (a trained qtool model on the kernels against fp32 PyTorch), and
the suite's rows as text lines and Markdown (``benchmarks/bench_kernels.py``).

Kept apart from ``qtool.bench`` so that the edge install (onnxruntime, no torch) never imports
torch. Both commands return the JSON document and print a table.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from qtool.checkpoint import load_model
from qtool.errors import QtoolError
from qtool.lowbit.bench import run_kernel_benchmarks
from qtool.lowbit.bench_model import bench_checkpoint_model
from qtool.lowbit.roofline import ROOFLINE_LABEL, ROOFLINE_SOURCE


def kernel_suite(threads: int, quick: bool, console: Console | None = None) -> dict:
    """``bench --kernels``: the contract's ``{"kernels": [...]}`` rows at ``threads`` threads."""
    console = console or Console()
    with console.status("timing the kernels against fp32 torch ..."):
        result = run_kernel_benchmarks([threads], quick, json_path=None)
    table = Table(title=f"qtool kernels vs fp32 torch, {threads} thread(s), medians of alternating runs",
                  caption=f"{ROOFLINE_LABEL}: {ROOFLINE_SOURCE}")
    for column in ("op", "shape", "isa", "ours ms", "fp32 ms", "speedup", ROOFLINE_LABEL):
        table.add_column(column, justify="left" if column in ("op", "shape", "isa") else "right")
    for row in result["kernels"]:
        roofline = row.get("roofline_fraction")
        table.add_row(row["name"], str(row["shape"]), row["isa"], f"{row['ours_ms']:.3f}", f"{row['fp32_ms']:.3f}",
                      f"{row['speedup']:.2f}×", f"{roofline:.0%}" if isinstance(roofline, float) else "")
    console.print(table)
    return result


def checkpoint_on_kernels(path: str, threads: int, batch: int, repeats: int, console: Console | None = None) -> dict:
    """``bench CKPT.pt --backend kernels``: latency on the kernels, in fp32, and as trained
    (fake quantization), with the kernels' output drift from the trained model."""
    console = console or Console()
    if batch < 1 or repeats < 1:
        raise QtoolError("--batch and --runs must be at least 1")
    model, payload = load_model(path)
    torch.manual_seed(0)
    example = torch.randn(batch, payload["in_channels"], payload["image_size"], payload["image_size"])
    result = bench_checkpoint_model(model, example, threads, repeats)
    result["checkpoint"] = str(path)
    table = Table(title=f"{path} on qtool kernels ({result['backend']}, {result['isa']}), batch {batch}")
    for column in ("threads", "fp32 ms", "fake-quant ms", "kernels ms", "speedup vs fp32"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        table.add_row(str(row["threads"]), f"{row['fp32_ms']:.3f}", f"{row['fake_quant_ms']:.3f}",
                      f"{row['kernels_ms']:.3f}", f"{row['speedup']:.2f}×")
    console.print(table)
    agreement = result["top1_agreement"]
    console.print(f"{len(result['converted'])} layers on the kernels, {len(result['kept'])} kept as they were; "
                  f"max |kernels - trained| = {result['max_abs_diff']:.2e}"
                  + (f", top-1 agreement {agreement:.1%}" if agreement is not None else ""), soft_wrap=True)
    return result


def format_row(row: dict) -> str:
    text = (f"{row['name']:<24} {str(row['shape']):<28} t={row['threads']} {row['isa']:<7} "
            f"ours {row['ours_ms']:9.3f} ms  fp32 {row['fp32_ms']:9.3f} ms  x{row['speedup']:<6} ")
    if "gops" in row:
        text += f"{row['gops']:8.1f} {row['unit']:<10} {row['gbps']:7.2f} GB/s  "
        text += f"{ROOFLINE_LABEL} {row['roofline_fraction']:.2f}"
    else:
        text += f"max|diff| {row['max_abs_diff']:.2e}  top-1 agree {row['top1_agreement']}"
    if "speedup_vs_avx2_fp32" in row:
        text += f"  (fp32 on AVX2 {row['fp32_avx2_ms']:.3f} ms: x{row['speedup_vs_avx2_fp32']})"
    return text


def markdown_table(result: dict) -> str:
    """The rows of a ``run_kernel_benchmarks`` result as a Markdown table."""
    lines = [f"| kernel | shape | threads | ISA | ours ms | fp32 ms | speedup | throughput | GB/s | {ROOFLINE_LABEL} | "
             "fp32 on AVX2 only |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        if "gops" in r:
            throughput, gbps, roof = f"{r['gops']} {r['unit']}", f"{r['gbps']}", f"{r['roofline_fraction']:.2f}"
        else:
            throughput, gbps, roof = f"max diff {r['max_abs_diff']:.1e}", "", ""
        avx2 = f"{r['fp32_avx2_ms']} ms (x{r['speedup_vs_avx2_fp32']})" if "fp32_avx2_ms" in r else ""
        lines.append(f"| {r['name']} | {r['shape']} | {r['threads']} | {r['isa']} | {r['ours_ms']} | {r['fp32_ms']} | "
                     f"**{r['speedup']}x** | {throughput} | {gbps} | {roof} | {avx2} |")
    return "\n".join(lines + ["", f"{ROOFLINE_LABEL}: {ROOFLINE_SOURCE}."])
