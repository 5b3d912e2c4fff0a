"""Low-bit kernels: packed int4/int3 and binary (XNOR-popcount) GEMM and conv as torch ops.

- ``ops``: the ``torch.ops.qtool.*`` operators (C++/CUDA extension, or the pure-PyTorch
  reference when the extension cannot be built) and friendly wrappers.
- ``reference``: the pure-PyTorch oracle of every op.
- ``build``: the cached JIT build (``qtool build-kernels``).
- ``runtime``: runs a trained qtool model on the kernels.
- ``bench``: ``qtool bench --kernels``.

Importing this package compiles nothing; ``qtool.lowbit.ops`` loads (or builds) the extension.
"""
