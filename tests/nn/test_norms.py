"""The lineage's block parts: BatchNorm over the channels of token tensors, and LayerScale with a shift."""
from __future__ import annotations

import torch
from torch import nn

from didbq.nn.norms import ShiftedLayerScale, TokenBatchNorm


def test_token_batchnorm_normalises_channels_over_batch_and_tokens() -> None:
    norm = TokenBatchNorm(6).train()
    x = torch.randn(4, 9, 6) * 3 + 2
    y = norm(x)
    reference = nn.BatchNorm1d(6).train()
    assert torch.allclose(y, reference(x.reshape(-1, 6)).reshape(4, 9, 6))
    assert torch.allclose(y.mean(dim=(0, 1)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(norm.running_mean, reference.running_mean)
    norm.eval()
    assert torch.allclose(norm(x), (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps), atol=1e-5)


def test_layer_scale_starts_at_its_init_and_learns_a_shift() -> None:
    scale = ShiftedLayerScale(5, init=0.1)
    x = torch.randn(2, 3, 5)
    assert torch.allclose(scale(x), x * 0.1)
    scale(x).sum().backward()
    assert scale.alpha.grad is not None and scale.move.grad is not None
    assert ShiftedLayerScale(5, shift=False).move is None
