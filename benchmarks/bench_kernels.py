"""Benchmark the qtool low-bit kernels against fp32 PyTorch (the suite of `qtool bench --kernels`,
at several thread counts); what produced docs/BENCHMARKS_kernels.json and its tables.

    python benchmarks/bench_kernels.py --threads 1 2 --json docs/BENCHMARKS_kernels.json
    python benchmarks/bench_kernels.py --quick
    python benchmarks/bench_kernels.py --markdown docs/BENCHMARKS_kernels.json

The benchmarks live in qtool.lowbit.bench, the text and Markdown rows in qtool.lowbit.bench_cli.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark the qtool low-bit kernels against fp32 PyTorch.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="a few representative shapes (well under a minute)")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the rows of an earlier --json run as a table")
    args = parser.parse_args(argv)

    import torch

    from qtool.lowbit import ops
    from qtool.lowbit.bench import run_kernel_benchmarks
    from qtool.lowbit.bench_cli import format_row, markdown_table

    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)))
        return
    print(f"backend {ops.backend()}, ISAs {ops.supported_isas()}, torch {torch.__version__}")
    run_kernel_benchmarks(args.threads, args.quick, args.json_path, progress=lambda r: print(format_row(r), flush=True))


if __name__ == "__main__":
    main()
