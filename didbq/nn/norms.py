"""The lineage's block parts (method.md 6b): BatchNorm over the channels of token tensors, and LayerScale with a
shift before each residual addition."""
from __future__ import annotations

import torch
from torch import nn


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dimension of a [..., channels] tensor, statistics over every other
    dimension (batch and tokens): the `--replace-ln-bn` of BinaryViT / BHViT. Kept as it is at inference (not
    folded); under DDP each process keeps its own running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class ShiftedLayerScale(nn.Module):
    """x * alpha + move, per channel (last dimension), alpha initialised at `init` (the lineage's 0.1) and the
    shift at 0: a learnable damping of each branch before its residual addition."""

    def __init__(self, channels: int, init: float = 0.1, shift: bool = True) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), float(init)))
        self.move = nn.Parameter(torch.zeros(channels)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha + self.move if self.move is not None else x * self.alpha
