"""Binary attention cores: DIDB (DIBA + HFSC) and the baselines (plain threshold, BiT {0,a}, BiViT).

A core is called like `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)` on
[B, H, N, D] tensors, and also exposes the three steps (`scores`, `probabilities`, `aggregate`) for adapters whose
attention changes the scores between q·kᵀ and softmax. Every choice of method.md sections 2, 3 and 5 is a field of
`AttentionOptions`; the registered variants are presets of it.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from didbq.nn.binarizers import ACTIVATION_BINARIZERS, ActivationBinarizer
from didbq.nn.haar import TokenLayout, local_difference, low_band_of_tokens, split_tokens_into_bands
from didbq.nn.linear import BinaryLinear
from didbq.nn.rprelu import RPReLU
from didbq.registry import Registry

BinarizerName = Literal["sign", "rsign", "bit_signed", "identity"]


RECOMPUTE_AUTO_ENTRIES = 1024 * 1024


class AttentionOptions(BaseModel):
    """How an attention core binarizes and aggregates (a recipe's `attention:` section, on top of a preset)."""

    model_config = ConfigDict(extra="forbid")

    qk_binarizer: BinarizerName = Field("sign", description="binarizer of Q and K (per band)")
    v_binarizer: BinarizerName = Field("sign", description="binarizer of V")
    surrogate: Literal["approx_sign", "ste"] = Field("approx_sign", description="gradient of sign")
    probs: Literal["softmax", "threshold", "bit", "bivit"] = Field(
        "bit", description="attention-matrix binarizer: softmax keeps it real; threshold: A >= row mean; "
                           "bit: BiT's a*round(clip(A/a,0,1)); bivit: A >= 0.25*row max")
    probs_init_quantile: float = Field(0.75, gt=0, lt=1, description="bit: a/2 starts at this quantile of A")
    ensure_one_key: bool = Field(True, description="every query row keeps at least its maximum key")
    aggregation: Literal["plain", "diba"] = Field("diba", description="A_b V, or DIBA's differential form")
    differential: bool = Field(True, description="DIBA's - diag(A_b 1) V term (false: s V + A_b V + l Lap(V), "
                                                 "the ablation without the differences)")
    shortcut: Literal["head", "channel", "off"] = Field("head", description="DIBA's learnable shortcut s")
    shortcut_init: float = Field(1.0, description="initial value of s (1: DIBA is attention when A_b is the softmax; "
                                                  "with binary V and A_b 1 below 1 the own term (s - A_b 1) V can "
                                                  "outweigh A_b V: `didbq eval --attention` shows it)")
    local: Literal["laplacian", "neighbour_mean", "off"] = Field("laplacian", description="DIBA's local term")
    local_init: float = Field(0.0, description="initial value of the local coefficient l")
    hfsc: Literal["off", "shared", "separate"] = Field(
        "separate", description="Haar similarity: separate = added binary projection for the high band")
    hfsc_bands: Literal["one", "three"] = Field("one", description="one high band, or LH/HL/HH")
    hfsc_band_weights: Literal["learnable", "fixed"] = Field("learnable", description="the g of each band")
    prefix_tokens: Literal["global", "zero"] = Field(
        "global", description="class/register tokens: neighbours = the whole grid (global), or no local/high term")
    output_norm: bool = Field(False, description="LayerNorm over each head's output")
    context_shortcut: bool = Field(False, description="the lineage's Norm(A_b V) + q + k + v: the full-precision "
                                                      "q, k and v added to the (output_norm-ed) context")
    context_act: Literal["none", "rprelu"] = Field("none", description="RPReLU over each head's channels after "
                                                                       "the context shortcut")
    recompute: Literal["auto"] | bool = Field(
        "auto", description="keep only q, k and v for backward and recompute the [N, N] scores, probabilities "
                            "and A_b in it (memory per layer O(N D) instead of O(N^2), the core's forward runs twice); "
                            f"auto: where a call has more than {RECOMPUTE_AUTO_ENTRIES:,} query-key pairs "
                            "per head (over 1,024 tokens)")

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        """YAML reads a bare `off` as False: take it as the "off" choice where a field has one."""
        if isinstance(data, dict):
            return {key: "off" if value is False and key in _OFF_FIELDS else value for key, value in data.items()}
        return data


_OFF_FIELDS = {"shortcut", "local", "hfsc"}


class _ElasticUnsigned(torch.autograd.Function):
    """BiT's a * round(clip(A / a, 0, 1)) with straight-through rounding, as one autograd node.

    With `ensure_one_key`, each row's maximum is forced to a when rounding dropped it; a forced entry is a
    constant (no gradient to A, gradient 1 to a). Composed from torch ops this chain keeps a dozen [N, N]
    temporaries and runs torch.where in backward. Here backward keeps A itself (softmax keeps the same tensor for
    its own backward, so it costs nothing more) and two boolean masks: 2 bytes per entry instead of the 9 of
    float copies of A / a and the rounded values and a mask, about 300 MB less per ViT-B layer at 1,374 tokens
    (dinov2 at 518 px) and a batch of 2.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor, scale: torch.Tensor, ensure_one_key: bool) -> torch.Tensor:  # noqa: ANN001
        ratio = probs / scale
        on = ratio > 0.5  # round(clip(A / a, 0, 1)) = 1; round half to even: exactly 0.5 rounds to 0
        passes = ratio <= 1.0  # clip's gradient (A >= 0 always)
        del ratio
        if ensure_one_key:
            forced = (probs == probs.amax(-1, keepdim=True)).logical_and_(~on)
            on.logical_or_(forced)
            passes.logical_xor_(forced)  # forced entries lie inside the clip: xor removes them
        ctx.save_for_backward(probs, scale, on, passes)
        return on.to(probs.dtype) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        probs, scale, on, passes = ctx.saved_tensors
        grad_probs = grad * passes.to(grad.dtype)
        # d(a * round(A / a))/da with straight-through rounding: round(.) - A / a inside the clip, 1 or 0 outside
        grad_scale = ((grad * on.to(grad.dtype)).sum_to_size(scale.shape)
                      - (grad_probs * probs).sum_to_size(scale.shape) / scale)
        return grad_probs, grad_scale, None


SHORT_MANTISSA_BITS = 12  # 24 - 12: sums of up to 2^12 - 1 multiples of a stay exact


class ProbabilityBinarizer(ActivationBinarizer):
    """Turns softmax rows into {0, a} with a learnable per-head scale a, initialised from the first batch."""

    def __init__(self, heads: int, kind: str, init_quantile: float, ensure_one_key: bool) -> None:
        super().__init__()
        self.kind = kind
        self.init_quantile = init_quantile
        self.ensure_one_key = ensure_one_key
        self.scale = nn.Parameter(torch.ones(heads, 1, 1))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def output_is_binary(self) -> bool:
        return self.kind != "softmax"

    def _initialise(self, probs: torch.Tensor) -> None:
        per_head = probs.detach().movedim(-3, 0).reshape(probs.shape[-3], -1)
        step = max(1, per_head.shape[1] // 200_000)
        sample = per_head[:, ::step].float()
        if self.kind == "bit":
            value = 2 * torch.quantile(sample, self.init_quantile, dim=1)
        else:
            value = 1.0 / self._mask(probs.detach()).float().sum(-1).movedim(-2, 0).reshape(probs.shape[-3], -1).mean(1)
        self.scale.copy_(value.clamp_min(1e-4).reshape(-1, 1, 1).to(self.scale.dtype))
        self.initialised.fill_(True)

    def _mask(self, probs: torch.Tensor) -> torch.Tensor:
        if self.kind == "threshold":
            valid = (probs > 0).sum(-1, keepdim=True).clamp_min(1)
            return probs >= probs.sum(-1, keepdim=True) / valid
        return probs >= 0.25 * probs.amax(-1, keepdim=True)

    def value(self) -> torch.Tensor:
        """The a of {0, a} per head, [heads, 1, 1], rounded to SHORT_MANTISSA_BITS significant bits (gradient
        straight through): A_b V then sums at most 2^11 terms ±a exactly in fp32, in any order, so the float
        path, batched or not, and the packed kernel (an integer count times a) agree to the last bit."""
        scale = self.scale.abs().clamp_min(1e-6)
        mantissa, exponent = torch.frexp(scale.detach())
        rounded = torch.ldexp(torch.round(mantissa * 2.0 ** SHORT_MANTISSA_BITS) / 2.0 ** SHORT_MANTISSA_BITS, exponent)
        return scale + (rounded - scale.detach())

    def binarize(self, probs: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return probs
        if self.training and not bool(self.initialised):
            with torch.no_grad():
                self._initialise(probs)
        scale = self.value()
        if self.kind == "bit":
            return _ElasticUnsigned.apply(probs, scale, self.ensure_one_key)
        mask = self._mask(probs).to(probs.dtype)
        ones = probs + (mask - probs).detach()
        if self.ensure_one_key:
            row_max = (probs == probs.amax(-1, keepdim=True)).to(probs.dtype)
            ones = torch.maximum(ones, row_max)
        return scale * ones


def _apply_mask(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask


class BinaryAttention(nn.Module):
    """The configurable binary attention core (all registered variants are instances of it).

    `heads`, `head_dim`, `queries`, `keys` and `layout` come from the converter's probe of the full-precision
    model. DIBA needs self-attention (query i is key i) and its local term and HFSC need a token grid; where a
    layer lacks them (cross-attention, sub-sampled keys, XCiT's channel attention) those parts are off for that
    layer and `disabled_parts` says so. `in_features` (the attention input width, given when the input tokens
    are the query tokens) and `qk_weight` (the [2*H*D, C] rows of the model's q and k projections) let HFSC add
    its separate high-band projection.
    """

    def __init__(self, options: AttentionOptions, heads: int, head_dim: int, layout: TokenLayout,
                 queries: int, keys: int, in_features: int | None = None,
                 qk_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.options = options
        self.heads, self.head_dim, self.layout = heads, head_dim, layout
        paired = queries == keys
        has_grid = layout.grid_for(queries) is not None
        self.diba = options.aggregation == "diba" and paired
        self.use_local = self.diba and options.local != "off" and has_grid
        self.hfsc = options.hfsc if paired and has_grid else "off"
        self.disabled_parts = [part for part, wanted, active in (
            ("diba", options.aggregation == "diba", self.diba),
            ("local", options.aggregation == "diba" and options.local != "off", self.use_local),
            ("hfsc", options.hfsc != "off", self.hfsc != "off")) if wanted and not active]
        band_count = 1 if self.hfsc == "off" else (2 if options.hfsc_bands == "one" else 4)
        make = ACTIVATION_BINARIZERS
        self.q_binarizers = nn.ModuleList(make[options.qk_binarizer](head_dim, options.surrogate)
                                          for _ in range(band_count))
        self.k_binarizers = nn.ModuleList(make[options.qk_binarizer](head_dim, options.surrogate)
                                          for _ in range(band_count))
        self.v_binarizer = make[options.v_binarizer](head_dim, options.surrogate)
        self.prob_binarizer = ProbabilityBinarizer(heads, options.probs, options.probs_init_quantile,
                                                   options.ensure_one_key)
        weights = torch.ones(band_count, heads, 1, 1) if band_count > 1 else None
        if weights is not None and options.hfsc_band_weights == "learnable":
            self.band_weights = nn.Parameter(weights)
        else:
            self.register_buffer("band_weights", weights)
        self.high_projection = None
        if self.hfsc == "separate" and in_features is not None:
            self.high_projection = self._high_projection(in_features, band_count - 1, qk_weight)
        self.shortcut = None
        if self.diba and options.shortcut != "off":
            shape = (heads, 1, 1) if options.shortcut == "head" else (heads, 1, head_dim)
            self.shortcut = nn.Parameter(torch.full(shape, options.shortcut_init))
        self.local_weight = None
        if self.use_local:
            self.local_weight = nn.Parameter(torch.full((heads, 1, head_dim), options.local_init))
        self.output_norm = nn.LayerNorm(head_dim) if options.output_norm else None
        self.context_act = RPReLU(head_dim) if options.context_act == "rprelu" else None
        self.score_tap = nn.Identity()  # what a distillation loss on the attention scores hooks
        self._attn_input: torch.Tensor | None = None
        self.last_call: dict[str, int] | None = None

    def _high_projection(self, in_features: int, detail_bands: int, qk_weight: torch.Tensor | None) -> nn.ModuleList:
        projections = nn.ModuleList()
        for _ in range(detail_bands):
            layer = BinaryLinear(in_features, 2 * self.heads * self.head_dim, bias=False, input_binarizer="rsign",
                                 surrogate=self.options.surrogate)
            if qk_weight is not None:
                with torch.no_grad():
                    layer.weight.copy_(qk_weight)
            projections.append(layer)
        return projections

    def set_attention_input(self, x: torch.Tensor | None) -> None:
        """The routed forward hands over the attention module's input, which HFSC's added projection reads."""
        self._attn_input = x

    def _bands(self, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor | None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The Haar bands of q and k (low first); with the separate projection the detail bands of q and k come
        from the projected detail bands of the attention input x, so only their low band is computed."""
        opts = self.options
        if self.hfsc == "off" or q.shape[-2] != k.shape[-2]:
            return None
        if self.high_projection is not None and x is not None and x.shape[:-1] == (q.shape[0], q.shape[-2]):
            x_bands = split_tokens_into_bands(x, self.layout, opts.hfsc_bands, opts.prefix_tokens)
            q_low = low_band_of_tokens(q, self.layout, opts.prefix_tokens)
            k_low = low_band_of_tokens(k, self.layout, opts.prefix_tokens)
            if x_bands is None or q_low is None or k_low is None:
                return None
            q_bands, k_bands = [q_low], [k_low]
            for projection, x_band in zip(self.high_projection, x_bands[1:]):
                qk = projection(x_band).reshape(x.shape[0], x.shape[1], 2, self.heads, self.head_dim)
                q_high, k_high = qk.permute(2, 0, 3, 1, 4).unbind(0)
                q_bands.append(q_high)
                k_bands.append(k_high)
            return q_bands, k_bands
        q_bands = split_tokens_into_bands(q, self.layout, opts.hfsc_bands, opts.prefix_tokens)
        k_bands = split_tokens_into_bands(k, self.layout, opts.hfsc_bands, opts.prefix_tokens)
        return None if q_bands is None or k_bands is None else (q_bands, k_bands)

    def scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Binary Q·Kᵀ * scale; with HFSC the weighted sum of the per-band binary similarities.

        With one band the product comes first and the scale after, as in the packed kernel ((D - 2 popcount) *
        scale): ±1 products are exact integers in any summation order, so keys at the same Hamming distance get
        the same score, and a row's ties (ensure_one_key keeps all of its best keys) are the kernel's. Scaling
        the queries first saves an [N, N] multiply but rounds each sum differently under a scale that is not a
        power of two (head dim 32: pvt_v2). With HFSC the scale and band weights multiply the binary queries
        ([N, D]) and the bands are concatenated along the head dimension so that one batched product sums them.
        """
        return self._scores(q, k, scale, self._attn_input)

    def _scores(self, q: torch.Tensor, k: torch.Tensor, scale: float, attn_input: torch.Tensor | None
                ) -> torch.Tensor:
        self.record_call(q, k)
        bands = self._bands(q, k, attn_input)
        if bands is None:
            return self.score_tap((self.q_binarizers[0](q) @ self.k_binarizers[0](k).transpose(-2, -1)).mul_(scale))
        q_bands, k_bands = bands
        queries = torch.cat([binarizer(band) * (weight * scale) for binarizer, band, weight
                             in zip(self.q_binarizers, q_bands, self.band_weights)], dim=-1)
        keys = torch.cat([binarizer(band) for binarizer, band in zip(self.k_binarizers, k_bands)], dim=-1)
        return self.score_tap(queries @ keys.transpose(-2, -1))

    def record_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Keep the shapes of this call for `products` (the report's count of binary operations)."""
        self.last_call = {"batch": q.shape[:-3].numel(), "query_dims": q.dim(), "heads": q.shape[-3],
                          "queries": q.shape[-2], "keys": k.shape[-2], "head_dim": q.shape[-1],
                          "value_dim": (k if v is None else v).shape[-1]}

    def probabilities(self, scores: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        """softmax, then the probability binarizer (adapters that mix heads in between call the two apart)."""
        probs = self.prob_binarizer(scores.softmax(dim=-1))
        return F.dropout(probs, dropout_p) if dropout_p > 0 and self.training else probs

    def aggregate(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A_b V, or DIBA: s V + (A_b V - diag(A_b 1) V) + l Lap(V) (self-attention only; `differential: false`
        drops the diag(A_b 1) V term)."""
        if self.last_call is not None:
            self.last_call["value_dim"] = v.shape[-1]
        v = self.v_binarizer(v)
        out = probs @ v
        if self.diba and probs.shape[-2] == probs.shape[-1]:
            out = self.diba_terms(out, v, lambda: probs.sum(-1, keepdim=True))
        return self.output_norm(out) if self.output_norm is not None else out

    def context(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The lineage's attention-context shortcut: out + q + k + v (full precision, where the shapes agree:
        self-attention), then RPReLU; `out` as it is when both are off."""
        if self.options.context_shortcut and q.shape == k.shape == v.shape == out.shape:
            out = out + q + k + v
        return self.context_act(out) if self.context_act is not None else out

    def diba_terms(self, out: torch.Tensor, v: torch.Tensor, row_sums: Callable[[], torch.Tensor]) -> torch.Tensor:
        """DIBA's terms added to A_b V (binary V): s V - diag(A_b 1) V + l Lap(V); `row_sums` gives A_b 1."""
        shortcut = self.shortcut if self.shortcut is not None else 1.0
        if self.options.differential:
            shortcut = shortcut - row_sums()
        out = out + shortcut * v
        if self.local_weight is not None:
            local = local_difference(v, self.layout, self.options.local, self.options.prefix_tokens)
            out = out + self.local_weight * local
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        if q.dim() == 3:  # [batch * heads, N, D] (samvit): per-head parameters cannot follow the batch, so one head
            mask = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
            return self(q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3), mask, dropout_p, is_causal, scale,
                        enable_gqa).squeeze(-3)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self._recomputes(q, k):
            return checkpoint(self._attention, q, k, v, self._attn_input, attn_mask, dropout_p, is_causal, scale,
                              use_reentrant=False)
        return self._attention(q, k, v, self._attn_input, attn_mask, dropout_p, is_causal, scale)

    def _recomputes(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether backward recomputes this call's [N, N] tensors instead of keeping them (`options.recompute`)."""
        wanted = self.options.recompute
        if wanted == "auto":
            wanted = q.shape[-2] * k.shape[-2] > RECOMPUTE_AUTO_ENTRIES
        return wanted and torch.is_grad_enabled()

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_input: torch.Tensor | None,
                   attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float) -> torch.Tensor:
        scores = _apply_mask(self._scores(q, k, scale, attn_input), attn_mask, is_causal)
        return self.context(self.aggregate(self.probabilities(scores, dropout_p), v), q, k, v)

    def products(self) -> list[tuple[str, int, bool]]:
        """The matrix products of the last call, whole batch: (name, MACs, both operands binary)."""
        if self.last_call is None:
            return []
        c = self.last_call
        qk_macs = c["batch"] * c["heads"] * c["queries"] * c["keys"] * c["head_dim"]
        av_macs = c["batch"] * c["heads"] * c["queries"] * c["keys"] * c["value_dim"]
        bands = len(self.q_binarizers)
        qk_binary = all(b.enabled and b.output_is_binary for b in (*self.q_binarizers, *self.k_binarizers))
        av_binary = (self.prob_binarizer.enabled and self.prob_binarizer.output_is_binary
                     and self.v_binarizer.enabled and self.v_binarizer.output_is_binary)
        names = ["q·kᵀ"] if bands == 1 else ["q·kᵀ low"] + [f"q·kᵀ band {i}" for i in range(1, bands)]
        return [(name, qk_macs, qk_binary) for name in names] + [("attn·v", av_macs, av_binary)]


ATTENTION_VARIANTS: Registry[AttentionOptions] = Registry("attention variant")
"""Named presets; a recipe picks one with `attention.variant` and may override any field."""

ATTENTION_VARIANTS.register("softmax")(AttentionOptions(
    qk_binarizer="identity", v_binarizer="identity", probs="softmax", aggregation="plain", hfsc="off",
    ensure_one_key=False))
ATTENTION_VARIANTS.register("plain")(AttentionOptions(probs="threshold", aggregation="plain", hfsc="off"))
ATTENTION_VARIANTS.register("bit")(AttentionOptions(
    qk_binarizer="bit_signed", v_binarizer="bit_signed", surrogate="ste", probs="bit", aggregation="plain",
    hfsc="off"))
ATTENTION_VARIANTS.register("bivit")(AttentionOptions(probs="bivit", aggregation="plain", hfsc="off"))
ATTENTION_VARIANTS.register("didb")(AttentionOptions())
