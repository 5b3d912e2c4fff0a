"""C++ and CUDA sources of the qtool op library (low-bit kernels and training ops).

This directory installs as ``qtool._kernels`` (package data only) so that a non-editable
install can still JIT-build the library; ``qtool.native.build`` compiles it.
"""
