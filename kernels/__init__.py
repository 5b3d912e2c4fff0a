"""C++ and CUDA sources of the qtool low-bit kernels.

This directory installs as ``qtool._kernels`` (package data only) so that a non-editable
install can still JIT-build the extension; ``qtool.lowbit.build`` compiles it.
"""
