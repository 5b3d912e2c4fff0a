"""BatchNorm over the global batch while a model trains data-parallel.

Why synchronise: in training mode BatchNorm normalises with the mean and variance of the batch
it sees. Under DDP each rank sees only its slice, so per-rank statistics would make a 2-process
run a different computation from a 1-process run with the same global batch (noisier
statistics, different gradients). With global statistics the two are the same function and
differ only by floating-point summation order; the cost is one small all-reduce per BatchNorm
layer in the forward pass and one in the backward pass.

``torch.nn.SyncBatchNorm`` does this on GPUs but refuses CPU tensors (its statistics kernels
are CUDA-only), so CPU ranks use ``GlobalBatchNorm`` below: the same arithmetic written with
ordinary tensor ops around a differentiable all-reduce, letting autograd derive the backward
pass (the all-reduce of the gradients of the statistics that SyncBatchNorm hand-codes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qtool.train.distributed import World


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is again the sum over ranks: each rank's statistics
    feed every rank's loss, so each rank's share of the gradient collects all of them."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks (CPU)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # running statistics: nothing to synchronise
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        # Sums in float64: E[x^2] - E[x]^2 loses digits in float32 when |mean| >> std.
        local = torch.cat([
            x.sum(dims, dtype=torch.float64),
            (x * x).sum(dims, dtype=torch.float64),
            x.new_full((1,), x.numel() // channels, dtype=torch.float64),
        ])
        total = _SumOverRanks.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), var.detach(), count.detach())
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As ``torch.nn.BatchNorm``: exponential average (or cumulative when momentum is None),
        with the unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _global_version(norm: _BatchNorm, world: World) -> nn.Module:
    """A synchronised layer that shares ``norm``'s parameters and buffers (same tensors)."""
    kind = nn.SyncBatchNorm if world.device.type == "cuda" else GlobalBatchNorm
    synced = kind(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    synced.weight, synced.bias = norm.weight, norm.bias
    synced.running_mean, synced.running_var = norm.running_mean, norm.running_var
    synced.num_batches_tracked = norm.num_batches_tracked
    synced.train(norm.training)
    return synced


@contextmanager
def global_batch_statistics(model: nn.Module, world: World) -> Iterator[nn.Module]:
    """While inside, every BatchNorm layer of ``model`` normalises over the global batch.

    The layers are swapped for synchronised ones that share their tensors, and swapped back on
    exit, so the model that leaves training has its ordinary BatchNorm layers (which exporters
    and BN folding recognise) holding the trained values."""
    if not world.is_distributed:
        yield model
        return
    swapped = []
    for name, module in list(model.named_modules()):
        if name and isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _global_version(module, world))
            swapped.append((parent, child, module))
    try:
        yield model
    finally:
        for parent, child, module in swapped:
            module.train(getattr(parent, child).training)
            setattr(parent, child, module)
