"""BinaryConv2d: 1-bit weights (per-output-channel scaled signs) times 1-bit inputs, for the convolutions of hybrid
ViTs (MBConv blocks, 1x1 projections, spatial-reduction and depthwise convolutions).

It is BinaryLinear over [N, C, H, W] feature maps: the same weight binarizer over each output channel's
(in_channels / groups) * kh * kw weights, the same input binarizers over the channel dimension, the same stage
switches and fixed weights (BinaryLayer), and the optional shortcut y = act(norm(BinConv(x)) + x) where the
convolution keeps the shape (as many output as input channels, stride 1, a size-preserving padding).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, LayerNorm2d, pad_same
from torch import nn
from torch.nn.modules.utils import _pair

from didbq.errors import DidbqError
from didbq.nn.binary import BinaryLayer

Pair = tuple[int, int]


def _static_padding(padding: int | tuple[int, int] | str, kernel: Pair, dilation: Pair) -> Pair:
    """Integer padding per side: 'valid' is 0, 'same' (stride 1) half of d * (k - 1) where that is even."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise DidbqError(f"padding='same' with kernel {kernel} and dilation {dilation} pads unevenly; "
                             f"BinaryConv2d pads both sides alike: keep this convolution full precision")
        return total[0] // 2, total[1] // 2
    return _pair(padding)


def _shortcut_refusal(in_channels: int, out_channels: int, stride: Pair, keeps_size: bool) -> str:
    """Why y + x cannot be formed (empty when it can): the convolution must keep the shape of x."""
    reasons = [f"channels {in_channels} -> {out_channels}" if in_channels != out_channels else "",
               f"stride {stride}" if stride != (1, 1) else "", "" if keeps_size else "a size-changing padding"]
    reasons = [r for r in reasons if r]
    return f"no shortcut: the output's shape is not the input's ({', '.join(reasons)})" if reasons else ""


class BinaryConv2d(BinaryLayer):
    """A drop-in replacement for nn.Conv2d (zero padding) with binary weights and inputs; see BinaryLayer for
    the switches and fixed weights. Binary weights multiply as conv(x_b, signs) * scale + bias, so ±1 inputs
    give exact integer sums before the one multiply. `same` pads like timm's Conv2dSame (TF 'SAME',
    computed per input size), after the inputs are binarized, so a padded position counts 0 as with nn.Conv2d.
    """

    channel_view = (-1, 1, 1)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair, stride: int | Pair = 1,
                 padding: int | Pair | str = 0, dilation: int | Pair = 1, groups: int = 1, bias: bool = True,
                 input_binarizer: str = "rsign", surrogate: str = "approx_sign", shortcut: bool = False,
                 norm: Literal["layernorm", "batchnorm", "none"] = "none", act: nn.Module | None = None,
                 same: bool = False) -> None:
        if in_channels % groups or out_channels % groups:
            raise DidbqError(f"groups={groups} must divide {in_channels} input and {out_channels} output channels")
        kernel, dilation = _pair(kernel_size), _pair(dilation)
        super().__init__((out_channels, in_channels // groups, *kernel), in_channels, bias, input_binarizer,
                         surrogate)
        self.in_channels, self.out_channels, self.groups, self.same = in_channels, out_channels, groups, same
        self.kernel_size, self.stride, self.dilation = kernel, _pair(stride), dilation
        self.padding = (0, 0) if same else _static_padding(padding, kernel, dilation)
        keeps_size = same or all(2 * p == d * (k - 1) for p, d, k in zip(self.padding, dilation, kernel))
        refusal = _shortcut_refusal(in_channels, out_channels, self.stride, keeps_size)
        self.shortcut = shortcut and not refusal
        self.shortcut_note = refusal if shortcut else ""
        # LayerNorm over channels with nn.LayerNorm's eps, as BinaryLinear's
        self.norm = (LayerNorm2d(out_channels, eps=1e-5) if norm == "layernorm" else
                     nn.BatchNorm2d(out_channels) if norm == "batchnorm" else nn.Identity())
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> "BinaryConv2d":
        """The binary form of `conv` (its weight and bias copied): a plain nn.Conv2d with zero padding, or
        timm's Conv2dSame; other padding modes and subclasses with their own forward are refused."""
        if conv.padding_mode != "zeros":
            raise DidbqError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}: BinaryConv2d pads "
                             f"with zeros only; keep it full precision (an ignore entry of the recipe)")
        same = isinstance(conv, Conv2dSame)
        if not same and (type(conv).forward, type(conv)._conv_forward) != (nn.Conv2d.forward, nn.Conv2d._conv_forward):
            raise DidbqError(f"{type(conv).__name__} computes its own forward (not nn.Conv2d's), which "
                             f"BinaryConv2d would drop; keep it full precision (an ignore entry of the recipe)")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None, same=same, **options)
        layer.copy_from(conv)
        return layer

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def binarize_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The binarizers work over the last dimension: channels are moved there and back (views)."""
        inputs = self.input_binarizer(x.movedim(1, -1)).movedim(-1, 1)
        return pad_same(inputs, self.kernel_size, self.stride, self.dilation) if self.same else inputs

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(x.shape, weight, grad, self.stride, self.padding, self.dilation,
                                          self.groups)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(x, shape, grad, self.stride, self.padding, self.dilation, self.groups)

    def channel_sum(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sum((0, 2, 3))

    def extra_repr(self) -> str:
        geometry = (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                    f"padding={'same (dynamic)' if self.same else self.padding}")
        extras = "".join(f", {k}={v}" for k, v in (("dilation", self.dilation), ("groups", self.groups))
                         if v not in ((1, 1), 1))
        return f"{self.in_channels}, {self.out_channels}, {geometry}{extras}, {self.mode_repr()}"
