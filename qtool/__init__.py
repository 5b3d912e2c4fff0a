"""qtool: quantization-aware training for domain generalization, low-bit kernels, ONNX export.

``import qtool`` stays free of torch so that ``qtool bench`` runs on an edge device with only
onnxruntime and numpy; ``qtool.prepare`` and ``qtool.export`` import torch when first used.
"""

__version__ = "0.1.0"

__all__ = ["prepare", "export", "__version__"]


def __getattr__(name: str):
    if name == "prepare":
        from qtool.quant.prepare import prepare

        return prepare
    if name == "export":
        from qtool.exporters import export

        return export
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
