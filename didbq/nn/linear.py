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

from didbq.nn.binarizers import ACTIVATION_BINARIZERS, ActivationBinarizer, binarize_weight
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


class _ScaledSignLinear(torch.autograd.Function):
    """y = (x @ signsᵀ) * scale + bias: the binary product first, then one multiply by the row scale.

    With ±1 inputs the product is an exact integer in fp32 whatever the summation order, so this form is
    reproducible to the last bit by didbq's packed kernel (popcount, then the same multiply and add). Backward
    costs what F.linear(x, signs * scale, bias) costs: the scale's gradient is a row sum of the weight gradient,
    so no [tokens, out] activation is kept.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor,  # noqa: ANN001 (autograd protocol)
                bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, signs)
        y = y.mul_(scale.to(y.dtype))
        if bias is not None:
            y = y.add_(bias.to(y.dtype))
        ctx.save_for_backward(x, signs, scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, signs, scale = ctx.saved_tensors
        need_x, need_signs, need_scale, need_bias = ctx.needs_input_grad
        grad_x = grad_signs = grad_scale = grad_bias = None
        if need_x:
            grad_x = (grad @ (signs * scale.unsqueeze(1)).to(grad.dtype)).to(x.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        if need_signs or need_scale:
            grad_weight = (flat.transpose(0, 1) @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(signs.dtype)
            grad_signs = grad_weight * scale.unsqueeze(1) if need_signs else None
            grad_scale = (grad_weight * signs).sum(1).to(scale.dtype) if need_scale else None
        if ctx.has_bias and need_bias:
            grad_bias = flat.sum(0).to(scale.dtype)
        return grad_x, grad_signs, grad_scale, grad_bias


class BinaryLinear(nn.Module):
    """A drop-in replacement for nn.Linear with binary weights and inputs.

    `weight` stays the latent full-precision weight (trained); the binary weight is derived in forward.
    `binarize_weights` / `input_binarizer.enabled` switch each half off for full-precision mode.
    A layer loaded from a packed file holds its binary weight itself (`fix_binary_weight`): `weight` then holds
    the signs, the non-persistent buffer `fixed_scale` the row scale, and nothing is binarized again
    (`weight_is_binary`). Binary weights multiply as (x @ signsᵀ) * scale + bias (see _ScaledSignLinear).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_binarizer: str = "rsign",
                 surrogate: str = "approx_sign", shortcut: bool = False,
                 norm: Literal["layernorm", "batchnorm", "none"] = "none", act: nn.Module | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.input_binarizer: ActivationBinarizer = ACTIVATION_BINARIZERS[input_binarizer](in_features, surrogate)
        self.binarize_weights = True
        self.weight_is_binary = False  # True once fix_binary_weight stored the signs in `weight`
        self.register_buffer("fixed_scale", None, persistent=False)
        # A shortcut needs one width to divide the other (e.g. not eva's 192 -> 1024 SwiGLU); elsewhere it is off.
        self.shortcut = shortcut and widths_match(in_features, out_features)
        self.norm = (nn.LayerNorm(out_features) if norm == "layernorm" else
                     TokenBatchNorm(out_features) if norm == "batchnorm" else nn.Identity())
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "BinaryLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **options)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def fix_binary_weight(self, signs: torch.Tensor, scale: torch.Tensor) -> None:
        """Make signs (±1, e.g. unpacked from a packed file) times the per-row `scale` the weight forward uses as
        it is: no latent weight is kept and nothing is binarized again, so the output is bit-identical to that of
        the latent model it came from."""
        with torch.no_grad():
            self.weight.copy_(signs)
        self.fixed_scale = scale.detach().reshape(-1, 1).to(self.weight.dtype).clone()
        self.binarize_weights = True
        self.weight_is_binary = True

    def binary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs in {-1, +1}, per-row scale [out, 1]) of the binary weight forward uses."""
        if self.weight_is_binary:
            return self.weight, self.fixed_scale
        return binarize_weight(self.weight)

    def effective_weight(self) -> torch.Tensor:
        if not self.binarize_weights:
            return self.weight
        signs, scale = self.binary_weight()
        return signs * scale

    @property
    def inputs_binary(self) -> bool:
        return self.input_binarizer.enabled and self.input_binarizer.output_is_binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.input_binarizer(x)
        if self.binarize_weights:
            signs, scale = self.binary_weight()
            y = _ScaledSignLinear.apply(inputs, signs, scale.reshape(-1), self.bias)
        else:
            y = F.linear(inputs, self.weight, self.bias)
        y = self.norm(y)
        return self.act(add_shortcut(y, x) if self.shortcut else y)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"weights={'binary' if self.binarize_weights else 'fp'}{' (fixed)' if self.weight_is_binary else ''}, "
                f"inputs={'binary' if self.inputs_binary else 'fp'}, shortcut={self.shortcut}")
