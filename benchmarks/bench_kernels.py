"""Benchmark the qtool low-bit kernels against fp32 PyTorch (same as `qtool bench --kernels`).

    python benchmarks/bench_kernels.py --threads 1 2 --json bench_kernels.json
    python benchmarks/bench_kernels.py --quick

Everything lives in qtool.lowbit.bench; this file only runs it.
"""

from qtool.lowbit.bench import main

if __name__ == "__main__":
    main()
