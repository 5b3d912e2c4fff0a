"""Quantizers, quantized layers and ``prepare``."""

from qtool.quant.layers import QuantConv2d, QuantLinear
from qtool.quant.lsq import LSQQuantizer
from qtool.quant.prepare import apply_plan, make_plan, prepare

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantLinear", "prepare", "make_plan", "apply_plan"]
