"""ONNX export that onnxruntime runs as integer kernels, and its verification against PyTorch.

``export`` is the entry point (``qtool.export`` re-exports it); the pieces, each with one job:
``capture`` (fx trace + calibration -> IR), ``adapters`` (one function per layer type),
``passes`` (batch-norm folding, encodings), ``onnx_graph`` (IR -> QDQ ONNX), ``verify``.
"""

from qtool.exporters.export import ExportResult, export

__all__ = ["export", "ExportResult"]
