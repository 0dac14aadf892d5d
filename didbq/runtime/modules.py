"""Inference modules that run on packed weights, and the swap of a model's binary layers into them."""
from __future__ import annotations

import torch
from torch import nn

from didbq.export.packing import pack_signs
from didbq.nn.attention import BinaryAttention
from didbq.nn.binarizers import Sign, hard_sign
from didbq.nn.linear import BinaryLinear, add_shortcut
from didbq.runtime.ops import PROBABILITY_KINDS, call, float_vector, weight_panels


def packable(layer: nn.Module) -> bool:
    """A BinaryLinear whose product is binary on both sides: binary weights, and inputs binarized by sign or
    rsign (ReActNet's sign(x + b)). BiT's a * sign(x + b) has a per-channel input scale, so it stays float."""
    return (isinstance(layer, BinaryLinear) and layer.binarize_weights and layer.input_binarizer.enabled
            and isinstance(layer.input_binarizer, Sign) and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu")


class PackedBinaryLinear(nn.Module):
    """BinaryLinear in eval mode on packed weights: 1 bit per weight in the kernel's panel layout plus a row
    scale; the input is binarized and packed inside the kernel, then the layer's own norm, shortcut and
    activation run as in BinaryLinear. Its output equals BinaryLinear's to the last bit (fp32, CPU)."""

    inference_only = True  # the packed format's writer refuses models holding one (nothing latent to pack)

    def __init__(self, layer: BinaryLinear) -> None:
        super().__init__()
        signs, scale = layer.binary_weight()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("panels", weight_panels(pack_signs(signs.detach().cpu() > 0), layer.in_features))
        self.register_buffer("alpha", float_vector(scale))
        self.register_buffer("bias", float_vector(layer.bias))
        self.register_buffer("shift", float_vector(getattr(layer.input_binarizer, "shift", None)))
        self.norm, self.act, self.shortcut = layer.norm, layer.act, layer.shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = call("binary_linear", flat, self.shift, self.panels, self.alpha, self.bias, self.out_features)
        y = self.norm(y.reshape(*x.shape[:-1], self.out_features))
        return self.act(add_shortcut(y, x) if self.shortcut else y)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, packed, "
                f"shift={self.shift is not None}, shortcut={self.shortcut}")


def _binary_sign(binarizer: nn.Module) -> bool:
    return isinstance(binarizer, Sign) and binarizer.enabled


class PackedBinaryAttention(BinaryAttention):
    """BinaryAttention whose SDPA-style call runs fused in C (kernels.c, didbq_binary_attention) when the core
    is one the kernel computes: sign or rsign Q, K and V, one band (no HFSC), a threshold, bit or bivit {0, a}
    matrix, no mask and no dropout. Every other call, and the `scores` / `probabilities` / `aggregate` steps that
    adapters call one by one, run the float path. A core becomes one in place (`adopt`), keeping its parameters.

    The products are exact on both paths (a has 12 significant bits, so the float path's sums of ±a are exact;
    the kernel multiplies an integer count by a). The softmax is not torch's: the kernel takes its exponentials
    from a table, so a mask entry whose probability lies within rounding of its threshold could differ; the
    tests and `didbq bench` compare whole models to the last bit (no difference seen)."""

    @classmethod
    def adopt(cls, core: BinaryAttention) -> None:
        """Make `core` (in eval mode, its parameters final) a PackedBinaryAttention, in place."""
        core.__class__ = cls
        binarizers = (core.q_binarizers[0], core.k_binarizers[0], core.v_binarizer)
        core.kernel_shifts = [float_vector(getattr(b, "shift", None)) for b in binarizers]
        core.kernel_scale = float_vector(core.prob_binarizer.value())

    def _fused(self, q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        """Whether this call runs in the kernel (in eval mode dropout does nothing on either path)."""
        return (not self.training and attn_mask is None and not is_causal and self.hfsc == "off" and q.dim() == 4 and q.dtype == torch.float32 and q.device.type == "cpu"
                and all(_binary_sign(b) for b in (self.q_binarizers[0], self.k_binarizers[0], self.v_binarizer))
                and self.prob_binarizer.enabled and self.prob_binarizer.kind in PROBABILITY_KINDS)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        if not self._fused(q, attn_mask, is_causal) or k.shape[-3] != q.shape[-3]:
            return super().forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        self.record_call(q, k, v)
        shifts, prob_scale = self.kernel_shifts, self.kernel_scale
        out, ones = call("binary_attention", q, k, v, *shifts, prob_scale,
                         float(q.shape[-1] ** -0.5 if scale is None else scale), self.prob_binarizer.kind,
                         self.prob_binarizer.ensure_one_key)
        if self.diba and q.shape[-2] == k.shape[-2]:
            v_signs = hard_sign(v if shifts[2] is None else v + shifts[2])
            out = self.diba_terms(out, v_signs, lambda: ones * prob_scale.view(-1, 1, 1))
        out = self.output_norm(out) if self.output_norm is not None else out
        return self.context(out, q, k, v)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_for_inference(model: nn.Module) -> list[str]:
    """Swap every packable BinaryLinear of `model` (see `packable`) for a PackedBinaryLinear and make every
    binary attention core a PackedBinaryAttention, in place; the model is put in eval mode. Returns the names
    of the swapped layers. BinaryConv2d layers (there is no packed convolution kernel) and BinaryLinear layers
    that are not packable stay on the float path, exact as they are."""
    model.eval()
    names = [name for name, module in model.named_modules() if packable(module)]
    with torch.no_grad():
        for name in names:
            _replace(model, name, PackedBinaryLinear(model.get_submodule(name)))
    for module in model.modules():
        if type(module) is BinaryAttention:
            PackedBinaryAttention.adopt(module)
    return names
