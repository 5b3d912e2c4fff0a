"""qtool: quantization-aware training for domain generalization, low-bit kernels, ONNX export."""

__version__ = "0.1.0"
