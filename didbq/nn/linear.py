"""BinaryLinear: 1-bit weights (row-scaled signs) times 1-bit inputs, with an optional full-precision shortcut.

The shortcut form is the ReActNet/BinaryViT block the DIDB recipe builds on: y = act(norm(BinLinear(x)) + x),
where x is repeated when the layer widens (qkv, fc1) and averaged over groups when it narrows (fc2), so that
magnitude information survives the binary product and reaches the next layer.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from didbq.nn.binary import BinaryLayer
from didbq.nn.norms import TokenBatchNorm


def widths_match(in_features: int, out_features: int) -> bool:
    """Whether the shortcut can resize the input: one width divides the other."""
    return in_features % out_features == 0 or out_features % in_features == 0


def add_shortcut(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y + x with x resized along the last dimension to y's width: repeated (tiled) when y is wider, averaged over
    the groups of channels j, j + width, ... when y is narrower. Broadcasting instead of repeating x avoids a
    full-size copy in forward and backward."""
    width, channels = y.shape[-1], x.shape[-1]
    if channels == width:
        return y + x
    if width > channels:
        return (y.unflatten(-1, (width // channels, channels)) + x.unsqueeze(-2)).flatten(-2)
    return y + x.unflatten(-1, (channels // width, width)).mean(dim=-2)


class BinaryLinear(BinaryLayer):
    """A drop-in replacement for nn.Linear with binary weights and inputs (see BinaryLayer for the switches and
    fixed weights). Binary weights multiply as (x @ signsᵀ) * scale + bias (see binary._ScaledSign)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_binarizer: str = "rsign",
                 surrogate: str = "approx_sign", shortcut: bool = False,
                 norm: Literal["layernorm", "batchnorm", "none"] = "none", act: nn.Module | None = None) -> None:
        super().__init__((out_features, in_features), in_features, bias, input_binarizer, surrogate)
        self.in_features = in_features
        self.out_features = out_features
        # A shortcut needs one width to divide the other (e.g. not eva's 192 -> 1024 SwiGLU); elsewhere it is off.
        self.shortcut = shortcut and widths_match(in_features, out_features)
        if shortcut and not self.shortcut:
            self.shortcut_note = f"no shortcut: widths {in_features} -> {out_features} do not divide"
        self.norm = (nn.LayerNorm(out_features) if norm == "layernorm" else
                     TokenBatchNorm(out_features) if norm == "batchnorm" else nn.Identity())
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "BinaryLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **options)
        layer.copy_from(linear)
        return layer

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return grad @ weight

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return grad.reshape(-1, grad.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])

    def channel_sum(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(-1, grad.shape[-1]).sum(0)

    add_shortcut = staticmethod(add_shortcut)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.mode_repr()}"
