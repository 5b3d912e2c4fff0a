"""Low-bit kernels: packed int4/int3 and binary (XNOR-popcount) GEMM and conv as torch ops.

- ``ops``: the low-bit ``torch.ops.qtool.*`` operators (compiled in the one op library,
  ``qtool.native``, or the pure-PyTorch reference when it cannot be built) and friendly wrappers.
- ``reference``: the pure-PyTorch oracle of every low-bit op.
- ``runtime``: converts a trained qtool model to run on the kernels (conversion only).
- ``bench``: the kernel suite of ``qtool bench --kernels``; ``roofline``: the reference VM's
  peaks its rows are measured against; ``bench_model``: a whole model on the kernels against
  fp32 (``qtool bench CKPT --backend kernels`` and the suite's end-to-end rows);
  ``bench_cli``: their tables, text lines and Markdown.

Importing this package compiles nothing; ``qtool.lowbit.ops`` loads (or builds) the library.
"""
