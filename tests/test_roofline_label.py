"""``qtool bench --kernels`` says where its roofline comes from: peaks and bandwidths measured on
the reference VM, not on the machine at hand."""

from __future__ import annotations

from rich.console import Console

from qtool.lowbit import bench_cli

ROW = {"name": "binary_gemm", "shape": [64, 576, 64], "ours_ms": 0.1, "fp32_ms": 0.4, "speedup": 4.0,
       "isa": "avx2", "threads": 1, "gops": 23.6, "unit": "G binMAC/s", "gbps": 1.2, "roofline_fraction": 0.11}


def test_the_printed_table_labels_the_roofline_with_its_source(monkeypatch):
    monkeypatch.setattr(bench_cli, "run_kernel_benchmarks", lambda *args, **kwargs: {"kernels": [ROW]})
    console = Console(record=True, width=300)
    bench_cli.kernel_suite(1, quick=True, console=console)
    text = " ".join(console.export_text().split())  # the caption wraps
    assert "roofline (ref. VM)" in text and "not on this machine" in text


def test_text_and_markdown_rows_label_the_roofline_with_its_source():
    assert "roofline (ref. VM) 0.11" in bench_cli.format_row(ROW)
    table = bench_cli.markdown_table({"kernels": [ROW]})
    assert "| roofline (ref. VM) |" in table and "research-kernels.md" in table and "not on this machine" in table
