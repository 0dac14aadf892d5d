"""What BinaryLinear and BinaryConv2d share: the latent weight and its binary form, the input binarizer, the
stage switches, a fixed binary weight from a packed file, and the scaled-sign product.

A subclass says how its product runs (`product`, `input_grad`, `weight_grad`, `channel_sum`, `channel_view`),
how inputs reach the binarizer (`binarize_inputs`) and how the shortcut adds (`add_shortcut`); everything else,
including what `set_binarization`, the packed file and the report read, lives here once.
"""
from __future__ import annotations

import torch
from torch import nn

from didbq.nn.binarizers import ACTIVATION_BINARIZERS, ActivationBinarizer, binarize_weight


class _ScaledSign(torch.autograd.Function):
    """y = product(x, signs) * scale + bias: the binary product first, then one multiply by the per-channel scale.

    With ±1 inputs the product is an exact integer in fp32 whatever the summation order, so this form is
    reproducible to the last bit by didbq's packed kernel (popcount, then the same multiply and add). Backward
    costs what product(x, signs * scale) + bias costs: the scale's gradient is a per-row sum of the weight
    gradient, so no output-sized activation is kept.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor,  # noqa: ANN001 (autograd protocol)
                bias: torch.Tensor | None, layer: "BinaryLayer") -> torch.Tensor:
        y = layer.product(x, signs)
        y = y.mul_(scale.to(y.dtype).view(layer.channel_view))
        if bias is not None:
            y = y.add_(bias.to(y.dtype).view(layer.channel_view))
        ctx.save_for_backward(x, signs, scale)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, signs, scale = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_signs, need_scale, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_signs = grad_scale = grad_bias = None
        per_row = scale.view(-1, *(1,) * (signs.dim() - 1))
        if need_x:
            grad_x = layer.input_grad(grad, (signs * per_row).to(grad.dtype), x).to(x.dtype)
        if need_signs or need_scale:
            grad_weight = layer.weight_grad(grad, x.to(grad.dtype), signs.shape).to(signs.dtype)
            grad_signs = grad_weight * per_row if need_signs else None
            grad_scale = (grad_weight * signs).flatten(1).sum(1).to(scale.dtype) if need_scale else None
        if ctx.has_bias and need_bias:
            grad_bias = layer.channel_sum(grad).to(scale.dtype)
        return grad_x, grad_signs, grad_scale, grad_bias, None


class BinaryLayer(nn.Module):
    """A layer with 1-bit weights (signs of the centred latent weight times a per-output-channel scale
    a = mean|W|, over each output channel's weights) and binarized inputs.

    `weight` stays the latent full-precision weight (trained); the binary weight is derived in forward.
    `binarize_weights` / `input_binarizer.enabled` switch each half off for full-precision mode (the training
    stages, `set_binarization`). A layer loaded from a packed file holds its binary weight itself
    (`fix_binary_weight`): `weight` then holds the signs, the non-persistent buffer `fixed_scale` the scale, and
    nothing is binarized again (`weight_is_binary`).
    """

    channel_view: tuple[int, ...] = (-1,)  # how a per-output-channel vector broadcasts over the product's output
    shortcut_note = ""  # why a requested shortcut is off (the plan shows it); empty when it is on or not asked

    def __init__(self, weight_shape: tuple[int, ...], in_channels: int, bias: bool, input_binarizer: str,
                 surrogate: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.input_binarizer: ActivationBinarizer = ACTIVATION_BINARIZERS[input_binarizer](in_channels, surrogate)
        self.binarize_weights = True
        self.weight_is_binary = False  # True once fix_binary_weight stored the signs in `weight`
        self.register_buffer("fixed_scale", None, persistent=False)

    def copy_from(self, source: nn.Module) -> None:
        """Take the device, dtype, weight and bias of the full-precision layer this one replaces."""
        self.to(device=source.weight.device, dtype=source.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if source.bias is not None:
                self.bias.copy_(source.bias)

    # ------------------------------------------------------------------ the product (subclasses)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def channel_sum(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def binarize_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_binarizer(x)

    def add_shortcut(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + x

    # ------------------------------------------------------------------ the binary weight

    def fix_binary_weight(self, signs: torch.Tensor, scale: torch.Tensor) -> None:
        """Make signs (±1, e.g. unpacked from a packed file, as rows or in the weight's shape) times the
        per-output-channel `scale` the weight forward uses as it is: no latent weight is kept and nothing is
        binarized again, so the output is bit-identical to that of the latent model it came from."""
        with torch.no_grad():
            self.weight.copy_(signs.reshape(self.weight.shape))
        self.fixed_scale = scale.detach().reshape(-1, 1).to(self.weight.dtype).clone()
        self.binarize_weights = True
        self.weight_is_binary = True

    def binary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs in {-1, +1} in the weight's shape, per-output-channel scale [out, 1]) of the binary weight
        forward uses: binarize_weight over each output channel's weights, flattened to one row."""
        if self.weight_is_binary:
            return self.weight, self.fixed_scale
        signs, scale = binarize_weight(self.weight.flatten(1))
        return signs.view_as(self.weight), scale

    def effective_weight(self) -> torch.Tensor:
        if not self.binarize_weights:
            return self.weight
        signs, scale = self.binary_weight()
        return signs * scale.view(-1, *(1,) * (signs.dim() - 1))

    @property
    def inputs_binary(self) -> bool:
        return self.input_binarizer.enabled and self.input_binarizer.output_is_binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.binarize_inputs(x)
        if self.binarize_weights:
            signs, scale = self.binary_weight()
            y = _ScaledSign.apply(inputs, signs, scale.reshape(-1), self.bias, self)
        else:
            y = self.product(inputs, self.weight, self.bias)
        y = self.norm(y)
        return self.act(self.add_shortcut(y, x) if self.shortcut else y)

    def mode_repr(self) -> str:
        return (f"bias={self.bias is not None}, "
                f"weights={'binary' if self.binarize_weights else 'fp'}{' (fixed)' if self.weight_is_binary else ''}, "
                f"inputs={'binary' if self.inputs_binary else 'fp'}, shortcut={self.shortcut}")
