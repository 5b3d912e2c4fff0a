"""A whole model on the kernels against the same network in fp32: ``qtool bench CKPT --backend
kernels`` (``bench_checkpoint_model``) and the end-to-end row of ``qtool bench --kernels``
(``bench_end_to_end``, on ``binary_resnet20``).

Three sides, timed interleaved (``qtool.timing``) at each thread count: the model converted to
the kernels (``qtool.lowbit.runtime.convert``), its plain fp32 twin (``dequantized``) and the
model as trained (fake quantization in PyTorch, for information).
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.lowbit import ops
from qtool.lowbit.fused import convert  # graph-prepared models: one fused integer op per layer
from qtool.lowbit.runtime import dequantized
from qtool.quant.binary import BinaryConv2d
from qtool.timing import interleaved_ms, medians

WARMUP = 3


@torch.no_grad()
def bench_checkpoint_model(model: nn.Module, example_input: torch.Tensor, threads: int | list[int] = (1, 2),
                           repeats: int = 20) -> dict:
    """Latency of ``model`` on the kernels against the same network in fp32 (``dequantized``)
    and as trained (fake quantization in PyTorch), plus how far the outputs drift."""
    model = model.eval()
    conversion = convert(model)
    fp32 = dequantized(model)
    reference_out, kernel_out = model(example_input), conversion.model(example_input)
    drift = (kernel_out - reference_out).abs().max().item()
    agreement = None
    if reference_out.dim() == 2 and reference_out.shape[1] > 1:
        agreement = (kernel_out.argmax(1) == reference_out.argmax(1)).float().mean().item()
    sides = {"kernels": lambda: conversion.model(example_input), "fp32": lambda: fp32(example_input),
             "fake_quant": lambda: model(example_input)}
    rows = []
    previous = torch.get_num_threads()
    try:
        for t in [threads] if isinstance(threads, int) else list(threads):
            torch.set_num_threads(t)
            times = medians(interleaved_ms(sides, repeats, WARMUP))
            rows.append({"threads": t, "fp32_ms": times["fp32"], "fake_quant_ms": times["fake_quant"],
                         "kernels_ms": times["kernels"], "speedup": times["fp32"] / times["kernels"]})
    finally:
        torch.set_num_threads(previous)
    return {"backend": ops.backend(), "isa": ops.isa(), "input_shape": list(example_input.shape),
            "converted": conversion.converted, "kept": conversion.kept, "max_abs_diff": drift,
            "top1_agreement": agreement, "results": rows}


def binary_resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (CIFAR, 16/32/64 channels) whose 3x3 block convs are binary (``BinaryConv2d``,
    one scale per layer); the stem, the 1x1 shortcuts and the classifier stay fp32, as in
    XNOR-Net/Bi-Real designs. Its BN statistics are random, so equal outputs mean something."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = BinaryConv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = BinaryConv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for block in range(3):
            layers.append(Block(cin, cout, 2 if stage and not block else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    model = nn.Sequential(*layers)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def bench_end_to_end(batch, threads, isa, repeats) -> dict:
    """The ``binary_resnet20_e2e`` row of the kernel suite."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = bench_checkpoint_model(binary_resnet20(), x, threads=[threads], repeats=repeats)
    r = result["results"][0]
    return {"name": "binary_resnet20_e2e", "shape": list(x.shape), "ours_ms": round(r["kernels_ms"], 4),
            "fp32_ms": round(r["fp32_ms"], 4), "speedup": round(r["speedup"], 2), "isa": isa, "threads": threads,
            "fake_quant_ms": round(r["fake_quant_ms"], 4), "max_abs_diff": result["max_abs_diff"],
            "top1_agreement": result["top1_agreement"], "converted_layers": len(result["converted"]),
            "note": "fp32_ms: the same network with float weights and no sign (plain fp32 ResNet-20)"}
