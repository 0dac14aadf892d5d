"""Per-family knowledge: which timm attention classes didbq converts, and how.

An adapter is keyed by the attention class's qualified name. Classes with an SDPA branch only need `prepare`
(force `fused_attn`, and for beit/eva/swinv2 make the qkv bias a separate addition so that the swapped `qkv` module
is actually called instead of `F.linear(x, self.qkv.weight, ...)`). Classes with an explicit softmax get a
`forward` that computes q, k, v as timm does and hands the products to the core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from didbq.nn.haar import TokenLayout
from didbq.registry import Registry

# Small position-bias MLPs and head mixers on 1 to 16 inputs: binarizing them saves nothing and breaks the bias.
FULL_PRECISION_PARTS: dict[str, str] = {
    "cpb_mlp": "continuous position-bias MLP (few inputs)",
    "meta_mlp": "position-bias meta MLP (few inputs)",
    "rel_pos": "relative-position bias module",
    "shared_rel_pos": "relative-position bias module",
    "proj_l": "talking-heads mixer over heads (few inputs)",
    "proj_w": "talking-heads mixer over heads (few inputs)",
    "pos_proj": "position projection (few inputs)",
}


def _force_fused(module: nn.Module) -> None:
    module.fused_attn = True


def _fused_where_offered(module: nn.Module) -> None:
    """A class found by what it does: take its SDPA branch where it has one (else it computes by hand)."""
    if hasattr(module, "fused_attn"):
        module.fused_attn = True


def _fused_with_separate_bias(module: nn.Module) -> None:
    module.fused_attn = True
    module.qkv_bias_separate = True


def _qk_rows(module: nn.Module) -> torch.Tensor | None:
    """The [2*H*D, C] weight rows that produce q and k, for seeding HFSC's added projection."""
    qkv = getattr(module, "qkv", None)
    if isinstance(getattr(qkv, "weight", None), torch.Tensor):
        return qkv.weight.detach()[: 2 * qkv.weight.shape[0] // 3].clone()
    for q_name, k_name in (("q", "k"), ("wq", "wk"), ("q_proj", "k_proj")):
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(getattr(q, "weight", None), torch.Tensor) and isinstance(getattr(k, "weight", None), torch.Tensor):
            return torch.cat([q.weight.detach(), k.weight.detach()]).clone()
    return None


def _same_layout(model: nn.Module, tokens: int) -> TokenLayout:
    """Global attention over a ViT's sequence: prefix tokens then the patch grid; anything else: a square grid."""
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and prefix + grid[0] * grid[1] == tokens:
        return TokenLayout(prefix, (int(grid[0]), int(grid[1])))
    return TokenLayout(0, None)


def _channel_layout(model: nn.Module, tokens: int) -> TokenLayout:
    return TokenLayout(spatial=False)


@dataclass(frozen=True)
class AttentionAdapter:
    """How one attention class is converted. A registered class knows its route; an unregistered class that looks
    like attention gets a `found` adapter, whose route (SDPA or explicit) the converter's probe decides."""

    family: str
    prepare: Callable[[nn.Module], None] = _force_fused
    forward: Callable[..., torch.Tensor] | None = None
    layout: Callable[[nn.Module, int], TokenLayout] = _same_layout
    qk_weight: Callable[[nn.Module], torch.Tensor | None] = _qk_rows
    found: bool = False

    @property
    def route(self) -> str:
        return "adapter" if self.forward is not None else "sdpa"


def found_adapter(cls: type) -> AttentionAdapter:
    """The adapter of an unregistered attention class: its family is its timm module (timm.models.levit: levit)."""
    return AttentionAdapter(cls.__module__.rpartition(".")[2], prepare=_fused_where_offered, found=True)


ADAPTERS: Registry[AttentionAdapter] = Registry("attention adapter")


def class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _cosine_window_attention(self: nn.Module, x: torch.Tensor, qkv: torch.Tensor, logit_scale: torch.Tensor,
                             bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Swin v2's cosine attention handed to the core: q and k normalised (q times the logit scale), the position
    bias and the shifted-window mask folded into one additive mask, scale 1."""
    batch_windows, tokens, channels = x.shape
    q, k, v = qkv.reshape(batch_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(1.0 / 0.01)).exp()
    k = F.normalize(k, dim=-1)
    if mask is not None:
        windows = mask.shape[0]
        bias = (bias.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(
            batch_windows // windows, -1, -1, -1, -1).reshape(batch_windows, self.num_heads, tokens, tokens)
    out = self.binary_core(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0,
                           scale=1.0)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch_windows, tokens, -1)))


def _swinv2_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's swinv2 WindowAttention; the qkv bias is added after the (binary) qkv module."""
    tokens = x.shape[1]
    qkv = self.qkv(x)
    if self.q_bias is not None:
        qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
    return _cosine_window_attention(self, x, qkv, self.logit_scale, (16 * torch.sigmoid(bias)).unsqueeze(0), mask)


def _swinv2_cr_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's swinv2_cr WindowMultiHeadAttention (meta-MLP position bias, per-head logit scale)."""
    logit_scale = self.logit_scale.reshape(1, self.num_heads, 1, 1)
    return _cosine_window_attention(self, x, self.qkv(x), logit_scale, self._relative_positional_encodings(), mask)


def _talking_heads_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """cait's TalkingHeadAttn: heads are mixed (full precision) before the softmax and before binarization."""
    batch, tokens, channels = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    core = self.binary_core
    scores = core.scores(q, k, self.scale)
    scores = self.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    probs = self.proj_w(scores.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    probs = self.attn_drop(core.prob_binarizer(probs))
    out = core.context(core.aggregate(probs, v), q, k, v)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))


def _cross_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """crossvit's CrossAttention: the class token queries all tokens."""
    batch, tokens, channels = x.shape
    heads = self.num_heads
    q = self.wq(x[:, 0:1, ...]).reshape(batch, 1, heads, channels // heads).permute(0, 2, 1, 3)
    k = self.wk(x).reshape(batch, tokens, heads, channels // heads).permute(0, 2, 1, 3)
    v = self.wv(x).reshape(batch, tokens, heads, channels // heads).permute(0, 2, 1, 3)
    out = self.binary_core(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, 1, channels)))


def _register(class_path: str, adapter: AttentionAdapter) -> None:
    ADAPTERS.register(class_path)(adapter)


_register("timm.layers.attention.Attention", AttentionAdapter("vision_transformer/deit/deit3"))
_register("timm.layers.attention.AttentionRope", AttentionAdapter("vision_transformer (rope)"))
_register("timm.models.swin_transformer.WindowAttention", AttentionAdapter("swin"))
_register("timm.models.swin_transformer_v2.WindowAttention",
          AttentionAdapter("swinv2", prepare=lambda m: None, forward=_swinv2_forward))
_register("timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention",
          AttentionAdapter("swinv2_cr", prepare=lambda m: None, forward=_swinv2_cr_forward))
_register("timm.models.beit.Attention", AttentionAdapter("beit", prepare=_fused_with_separate_bias))
_register("timm.models.eva.EvaAttention", AttentionAdapter("eva", prepare=_fused_with_separate_bias))
_register("timm.models.cait.ClassAttn", AttentionAdapter("cait (class attention)"))
_register("timm.models.cait.TalkingHeadAttn",
          AttentionAdapter("cait (talking heads)", prepare=lambda m: None, forward=_talking_heads_forward))
_register("timm.models.xcit.XCA", AttentionAdapter("xcit (channel attention)", layout=_channel_layout))
_register("timm.models.pvt_v2.Attention", AttentionAdapter("pvt_v2"))
_register("timm.models.vision_transformer_relpos.RelPosAttention", AttentionAdapter("relpos"))
_register("timm.models.twins.LocallyGroupedAttn", AttentionAdapter("twins (local)"))
_register("timm.models.twins.GlobalSubSampleAttn", AttentionAdapter("twins (global)"))
_register("timm.models.crossvit.CrossAttention",
          AttentionAdapter("crossvit", prepare=lambda m: None, forward=_cross_attention_forward))


# Token mixers that look like attention but compute no softmax(q kᵀ) v: their products stay full precision (their
# linears and convolutions follow the recipe's rules), and the plan lists them with this reason.
FULL_PRECISION_MIXERS: dict[str, str] = {
    "timm.models.volo.OutlookAttention": "outlook attention (weights from a linear of x, not q·kᵀ)",
    "timm.models.coat.FactorAttnConvRelPosEnc": "factorized attention (softmax(k)ᵀ v first, then q times it)",
    "timm.models.efficientvit_mit.LiteMLA": "ReLU linear attention (q (kᵀ v) without a softmax)",
    "timm.layers.non_local_attn.BilinearAttnTransform": "bilinear attention transform (block matrices from "
                                                        "convolutions, no q·kᵀ)",
}


def supported_families() -> list[str]:
    return sorted({ADAPTERS[name].family.split(" ")[0] for name in ADAPTERS})


def looks_like_attention(cls: type) -> bool:
    """A class that probably computes attention (for strict mode's 'unknown attention class' error)."""
    name = cls.__name__.lower()
    if any(word in name for word in ("block", "pool", "layer", "stage", "stack")):
        return False
    return any(word in name for word in ("attn", "attention", "mhsa", "gpsa")) or name in ("xca", "litemla")
