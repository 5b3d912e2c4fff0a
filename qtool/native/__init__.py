"""The one op library, ``torch.ops.qtool``: low-bit GEMM/conv and the training ops alike.

- ``build``: the cached JIT build of the C++/CUDA sources in ``kernels/`` (``qtool build-kernels``).
- ``library``: loads it once per process, or falls back to the pure-PyTorch reference.

Each op family registers itself through ``library.register``: ``qtool.lowbit.ops`` (packing,
low-bit and binary GEMM/conv), ``qtool.quant.fake_quant`` (LSQ) and
``qtool.quant.sign_estimator`` (ReSTE/STE sign). Importing this package compiles nothing.
"""
