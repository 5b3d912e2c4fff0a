"""Learned-step-size quantization (LSQ, Esser et al. 2020).

One quantizer holds one learned step size ``scale`` (per tensor, or per output channel for
weights). Forward: ``round(clamp(x / s, qmin, qmax)) * s`` with straight-through rounding.
Backward to ``s`` is the LSQ formula, multiplied by the gradient scale ``1 / sqrt(N * qmax)``
so that the step size learns at the same pace as the weights (``qtool.quant.fake_quant``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtool.quant.fake_quant import lsq_fake_quant

MIN_BITS, MAX_BITS = 2, 8


def integer_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """The integer grid ``[qmin, qmax]`` of a ``bits``-wide code.

    Signed codes are two's complement ([-8, 7] at 4 bits); ``narrow`` drops the most negative
    value ([-7, 7]) so that the grid is symmetric and a sign flip stays on the grid.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"LSQ supports {MIN_BITS} to {MAX_BITS} bits, got {bits}")
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size.

    ``signed=None`` (activations) decides the sign from the first batch: a tensor without
    negative values (the output of a ReLU) gets the unsigned grid, anything else the signed one.
    The first batch also initialises the step size (``init``): ``"lsq"`` is the paper's
    ``2 mean|x| / sqrt(qmax)``; ``"mse"`` searches the step that minimises the quantization
    error of that batch, which matters at 2-4 bits where the LSQ rule clips too much or too little.
    ``weight``: this quantizer holds a layer's weights (N of the gradient scale counts its
    elements per channel); otherwise it quantizes activations, whose leading dimension is the
    batch (N counts the features of one sample, so the step learns at a batch-size-free pace).
    """

    def __init__(
        self,
        bits: int,
        signed: bool | None,
        channels: int = 1,
        narrow: bool = False,
        init: str = "mse",
        weight: bool = False,
    ):
        super().__init__()
        integer_range(bits, True)  # validates bits
        if init not in ("lsq", "mse"):
            raise ValueError(f"unknown scale init {init!r}: use 'lsq' or 'mse'")
        self.bits = bits
        self.narrow = narrow
        self.init = init
        self.per_channel = channels > 1
        self.weight = weight
        self.scale = nn.Parameter(torch.ones(channels))
        # Buffers so that a saved checkpoint restores the decisions made on the first batch.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(bool(signed) if signed is not None else False))
        self.sign_from_data = signed is None

    # -- the integer grid -------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return bool(self.signed_flag)

    @property
    def qmin(self) -> int:
        return integer_range(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.signed, self.narrow)[1]

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape that broadcasts the scale over ``x`` (channel on dim 0 for per-channel weights)."""
        return (-1,) + (1,) * (x.dim() - 1) if self.per_channel else ()

    def elements_per_scale(self, x: torch.Tensor) -> int:
        """N in the LSQ gradient scale: weights per channel (or all of them, per tensor), or the
        features of one sample for activations."""
        if self.weight:
            return x[0].numel() if self.per_channel else x.numel()
        return x[0].numel() if x.dim() > 1 else x.numel()

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.sign_from_data:
            self.signed_flag.fill_(bool((x < 0).any()))
        values = x.detach().reshape(x.shape[0], -1) if self.per_channel else x.detach().reshape(1, -1)
        if self.init == "lsq":
            scale = 2 * values.abs().mean(dim=1) / math.sqrt(self.qmax)
        else:
            scale = self._mse_scale(values)
        self.scale.copy_(scale.clamp_min(1e-8).reshape_as(self.scale))
        self.initialized.fill_(True)

    def _mse_scale(self, values: torch.Tensor, candidates: int = 16) -> torch.Tensor:
        """Per row of ``values``: the step with least quantization MSE, by a coarse search over
        clipping levels in (0, max|x|] followed by a fine search around the best coarse level."""
        # One large activation batch is subsampled: the search only needs the distribution.
        if values.shape[1] > 65536:
            index = torch.linspace(0, values.shape[1] - 1, 65536, device=values.device).long()
            values = values[:, index]
        peak = values.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        top = max(abs(self.qmin), self.qmax)
        width = 1.0 / candidates
        centre = torch.full_like(peak, 0.5 + width / 2)
        for span in (1.0, 2 * width):  # coarse over the whole range, then fine around the best
            fractions = centre + span * (torch.arange(candidates, device=values.device) / (candidates - 1) - 0.5)
            steps = peak * fractions.clamp(1e-3, 1.0) / top  # rows x candidates
            # A loop over candidates keeps memory at one copy of the tensor (large convs).
            error = torch.stack([
                ((values / step[:, None]).round().clamp(self.qmin, self.qmax) * step[:, None] - values).pow(2).mean(dim=1)
                for step in steps.unbind(dim=1)
            ], dim=1)
            best = error.argmin(dim=1, keepdim=True)
            centre = fractions.gather(1, best)
        return steps.gather(1, best).squeeze(1)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        factor = 1.0 / math.sqrt(self.elements_per_scale(x) * self.qmax)
        return lsq_fake_quant(x, self.scale, self.qmin, self.qmax, factor)

    @torch.no_grad()
    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` on this quantizer's grid (what the exporter and kernels store)."""
        step = self.scale.reshape(self._shape(x))
        return torch.clamp((x / step).round(), self.qmin, self.qmax).to(torch.int32)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sign = "from data" if self.sign_from_data and not bool(self.initialized) else (
            "signed" if self.signed else "unsigned")
        return f"bits={self.bits}, {kind}, {sign}, narrow={self.narrow}"
