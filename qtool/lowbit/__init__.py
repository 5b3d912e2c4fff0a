"""Low-bit kernels: packed int4/int3 and binary (XNOR-popcount) GEMM and conv as torch ops.

- ``ops``: the low-bit ``torch.ops.qtool.*`` operators (compiled in the one op library,
  ``qtool.native``, or the pure-PyTorch reference when it cannot be built) and friendly wrappers.
- ``reference``: the pure-PyTorch oracle of every low-bit op.
- ``runtime``: runs a trained qtool model on the kernels.
- ``bench``: ``qtool bench --kernels``.

Importing this package compiles nothing; ``qtool.lowbit.ops`` loads (or builds) the library.
"""
