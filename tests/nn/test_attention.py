"""The binary attention cores: DIBA, HFSC and the baselines (method.md sections 2, 3 and 5)."""
from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.nn import (
    ATTENTION_VARIANTS,
    AttentionOptions,
    BinaryAttention,
    ProbabilityBinarizer,
    TokenLayout,
    hard_sign,
    local_difference,
    set_binarization,
)
from didbq.nn.binarizers import BiTSigned, Identity, Sign

FAST = settings(max_examples=25, deadline=None)

HEADS, HEAD_DIM = 2, 4
LAYOUT = TokenLayout(num_prefix=1)
TOKENS = 10  # class token + 3x3 grid


def make_core(variant: str = "didb", heads: int = HEADS, head_dim: int = HEAD_DIM, layout: TokenLayout = LAYOUT,
              queries: int = TOKENS, keys: int | None = None, in_features: int | None = None,
              qk_weight: torch.Tensor | None = None, **overrides) -> BinaryAttention:
    options = AttentionOptions(**{**ATTENTION_VARIANTS[variant].model_dump(), **overrides})
    return BinaryAttention(options, heads, head_dim, layout, queries, queries if keys is None else keys,
                           in_features=in_features, qk_weight=qk_weight)


def qkv(batch: int = 2, heads: int = HEADS, queries: int = TOKENS, keys: int | None = None,
        head_dim: int = HEAD_DIM, dtype: torch.dtype = torch.float32, grad: bool = False):
    keys = queries if keys is None else keys
    q = torch.randn(batch, heads, queries, head_dim, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, heads, keys, head_dim, dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, heads, keys, head_dim, dtype=dtype, requires_grad=grad)
    return q, k, v


def bool_mask(queries: int = TOKENS, keys: int = TOKENS) -> torch.Tensor:
    mask = torch.rand(queries, keys) > 0.4
    mask[:, 0] = True  # every row keeps at least one key
    return mask


def float_mask(queries: int = TOKENS, keys: int = TOKENS) -> torch.Tensor:
    return torch.randn(queries, keys)


MASKS = {"none": lambda: None, "bool": bool_mask, "float": float_mask}


# ---------------------------------------------------------------- presets


def test_variants_are_registered() -> None:
    assert set(ATTENTION_VARIANTS.names()) >= {"softmax", "plain", "bit", "bivit", "didb"}
    didb = ATTENTION_VARIANTS["didb"]
    assert (didb.aggregation, didb.hfsc, didb.probs, didb.shortcut, didb.local) == (
        "diba", "separate", "bit", "head", "laplacian")
    assert ATTENTION_VARIANTS["bivit"].probs == "bivit"
    assert ATTENTION_VARIANTS["plain"].probs == "threshold"
    with pytest.raises(pydantic.ValidationError):
        AttentionOptions(not_an_option=1)


def test_fresh_didb_core_parameters() -> None:
    core = make_core("didb", hfsc="off")
    assert core.diba and core.use_local and core.hfsc == "off" and core.disabled_parts == []
    assert torch.equal(core.shortcut.detach(), torch.ones(HEADS, 1, 1))
    assert torch.equal(core.local_weight.detach(), torch.zeros(HEADS, 1, HEAD_DIM))
    assert core.band_weights is None and core.high_projection is None
    channel = make_core("didb", hfsc="off", shortcut="channel")
    assert channel.shortcut.shape == (HEADS, 1, HEAD_DIM)
    assert make_core("didb", hfsc="off", shortcut="off").shortcut is None
    assert make_core("didb", hfsc="off", local="off").local_weight is None
    assert torch.equal(make_core("didb", hfsc="off", shortcut="channel", shortcut_init=0.4).shortcut.detach(),
                       torch.full((HEADS, 1, HEAD_DIM), 0.4))


# ---------------------------------------------------------------- full-precision mode equals attention


@pytest.mark.parametrize("variant", ["didb", "plain", "bit", "bivit"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("training", [True, False])
def test_binarization_off_equals_sdpa(variant: str, mask: str, training: bool) -> None:
    core = make_core(variant, hfsc="off")
    set_binarization(core, activations=False)
    core.train(training)
    q, k, v = qkv()
    attn_mask = MASKS[mask]()
    out = core(q, k, v, attn_mask=attn_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    # nothing was initialised from data while off
    assert not bool(core.prob_binarizer.initialised)


@pytest.mark.parametrize("variant", ["didb", "plain"])
def test_binarization_off_equals_sdpa_causal_and_scale(variant: str) -> None:
    core = make_core(variant, hfsc="off")
    set_binarization(core, activations=False)
    q, k, v = qkv()
    out = core(q, k, v, is_causal=True, scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("shortcut", ["head", "channel"])
@pytest.mark.parametrize("local", ["laplacian", "neighbour_mean"])
def test_diba_off_equals_sdpa_for_every_shortcut_and_local_form(shortcut: str, local: str) -> None:
    core = make_core("didb", hfsc="off", shortcut=shortcut, local=local, prefix_tokens="zero")
    set_binarization(core, activations=False)
    q, k, v = qkv()
    assert torch.allclose(core(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_softmax_variant_is_attention_even_when_enabled() -> None:
    core = make_core("softmax")
    q, k, v = qkv()
    mask = bool_mask()
    assert torch.allclose(core(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                          atol=1e-5)
    assert all(not binary for _, _, binary in core.products())


# ---------------------------------------------------------------- binary mode


@pytest.mark.parametrize("variant", ["didb", "plain", "bivit"])
def test_sign_qk_binarizers_give_plus_minus_one(variant: str) -> None:
    core = make_core(variant)
    q, k, _ = qkv()
    for binarizer in (*core.q_binarizers, *core.k_binarizers, core.v_binarizer):
        assert isinstance(binarizer, Sign)
    assert set(core.q_binarizers[0](q).flatten().tolist()) == {-1.0, 1.0}
    assert set(core.k_binarizers[0](k).flatten().tolist()) == {-1.0, 1.0}


def test_scores_are_product_of_signs() -> None:
    core = make_core("plain")
    q, k, _ = qkv()
    scores = core.scores(q, k, 0.5)
    assert torch.equal(scores, hard_sign(q) @ hard_sign(k).transpose(-2, -1) * 0.5)
    # integer dot products of +-1 vectors: values in {-D, -D+2, ..., D} (times the scale)
    assert set((scores / 0.5).flatten().tolist()) <= set(range(-HEAD_DIM, HEAD_DIM + 1, 2))


def test_bit_qk_binarizers_give_plus_minus_scale() -> None:
    core = make_core("bit")
    assert isinstance(core.q_binarizers[0], BiTSigned)
    core.train()
    q, k, v = qkv()
    core(q, k, v)
    for binarizer, x in ((core.q_binarizers[0], q), (core.k_binarizers[0], k), (core.v_binarizer, v)):
        assert bool(binarizer.initialised)
        out = binarizer(x).detach()
        assert torch.equal(out.abs(), binarizer.scale.detach().abs().expand_as(out))


def _capture(module: torch.nn.Module, store: dict, key: str) -> None:
    module.register_forward_hook(lambda m, a, o: store.__setitem__(key, o.detach()))


@pytest.mark.parametrize("variant", ["bit", "plain", "bivit", "didb"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool"])
def test_probability_binarizer_takes_two_values_per_head(variant: str, training: bool, mask: str) -> None:
    core = make_core(variant)
    core.train(training)
    seen: dict[str, torch.Tensor] = {}
    _capture(core.prob_binarizer, seen, "probs")
    q, k, v = qkv(queries=TOKENS)
    core(q * 3, k * 3, v, attn_mask=MASKS[mask]())
    probs = seen["probs"]
    scale = core.prob_binarizer.value().detach().flatten()
    assert torch.allclose(scale, core.prob_binarizer.scale.detach().abs().flatten(), rtol=2.0 ** -12)
    for head in range(HEADS):
        values = set(probs[:, head].flatten().tolist())
        assert values == {0.0, scale[head].item()}, (head, values)
    # every query row keeps at least one key
    assert ((probs != 0).sum(-1) >= 1).all()


@pytest.mark.parametrize("kind", ["bit", "threshold", "bivit"])
def test_ensure_one_key(kind: str) -> None:
    probs = torch.softmax(torch.randn(2, 3, 6, 6) * 0.1, dim=-1)  # flat rows: no entry reaches a high threshold
    for ensure in (True, False):
        binarizer = ProbabilityBinarizer(3, kind, 0.75, ensure)
        binarizer.eval()
        with torch.no_grad():
            binarizer.scale.fill_(10.0)  # bit: probs / a < 0.5 everywhere, so round gives 0
        out = binarizer(probs)
        assert set(out.flatten().tolist()) <= {0.0, 10.0}
        if ensure:
            assert ((out != 0).sum(-1) >= 1).all()
            argmax = probs.argmax(-1, keepdim=True)
            assert (out.gather(-1, argmax) == 10.0).all()
        elif kind == "bit":
            assert (out == 0).all()


@pytest.mark.parametrize("ensure", [False, True])
def test_bit_probability_gradients_match_straight_through_composition(ensure: bool) -> None:
    """The fused {0, a} binarizer has the gradients of a * round_ste(clip(A / a, 0, 1)); a row maximum that
    ensure_one_key forces to a is a constant: no gradient to A, gradient 1 to a."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 7, 7) * 2, dim=-1).requires_grad_()
    binarizer = ProbabilityBinarizer(3, "bit", 0.75, ensure).eval()
    with torch.no_grad():
        binarizer.scale.copy_(torch.tensor([0.1, 0.3, 0.9]).reshape(3, 1, 1))  # 0.9: most rows get forced
    upstream = torch.randn(2, 3, 7, 7)
    grad_probs, grad_scale = torch.autograd.grad((binarizer(probs) * upstream).sum(), [probs, binarizer.scale])

    a = binarizer.value().detach().clone().requires_grad_()  # a to 12 significant bits, gradient straight through
    leaf = probs.detach().clone().requires_grad_()
    clipped = (leaf / a).clamp(0.0, 1.0)
    rounded = clipped + (clipped.round() - clipped).detach()
    forced = torch.zeros_like(leaf, dtype=torch.bool)
    if ensure:
        forced = (leaf == leaf.amax(-1, keepdim=True)) & (rounded == 0)
        rounded = torch.where(forced, torch.ones_like(rounded), rounded)
    assert forced.any() == ensure
    expected_probs, expected_scale = torch.autograd.grad((a * rounded * upstream).sum(), [leaf, a])
    assert torch.allclose(grad_probs, expected_probs, atol=1e-6)
    assert torch.allclose(grad_scale, expected_scale, atol=1e-5)
    assert (grad_probs[forced] == 0).all()


def test_probability_binarizer_masks_by_hand() -> None:
    probs = torch.tensor([[[[0.5, 0.3, 0.15, 0.05]]]])
    threshold = ProbabilityBinarizer(1, "threshold", 0.75, False).eval()
    assert threshold(probs).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]  # >= row mean 0.25
    uniform = torch.full((1, 1, 1, 4), 0.25)
    assert threshold(uniform).flatten().tolist() == [1.0] * 4  # the mean itself is kept (>=)
    masked = torch.tensor([[[[0.6, 0.4, 0.0, 0.0]]]])  # masked keys (0) do not lower the mean (0.5)
    assert threshold(masked).flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    bivit = ProbabilityBinarizer(1, "bivit", 0.75, False).eval()
    assert bivit(probs).flatten().tolist() == [1.0, 1.0, 1.0, 0.0]  # >= 0.25 * 0.5
    bit = ProbabilityBinarizer(1, "bit", 0.75, False).eval()
    with torch.no_grad():
        bit.scale.fill_(0.4)
    a = bit.value().item()  # 0.4 to 12 significant bits
    assert a == pytest.approx(0.4, rel=2.0 ** -12)
    assert bit(probs).flatten().tolist() == [a, a, 0.0, 0.0]  # round(clip(A/a))
    softmax = ProbabilityBinarizer(1, "softmax", 0.75, True).train()
    assert torch.equal(softmax(probs), probs) and not softmax.output_is_binary
    assert not bool(softmax.initialised)


@pytest.mark.parametrize("differential", [True, False])
def test_binary_forward_equals_binary_products_by_hand(differential: bool) -> None:
    """With binarization on, the output is built only from +-1 Q, K, V and the {0, a} matrix (DIBA formula;
    without the differential term, s V + A_b V + l Lap(V))."""
    core = make_core("didb", hfsc="off", differential=differential)
    core.eval()
    with torch.no_grad():
        core.prob_binarizer.scale.copy_(torch.tensor([0.2, 0.3]).reshape(2, 1, 1))
        core.shortcut.copy_(torch.tensor([0.5, 1.5]).reshape(2, 1, 1))
        core.local_weight.copy_(torch.randn(HEADS, 1, HEAD_DIM))
    q, k, v = qkv()
    out = core(q, k, v)
    qb, kb, vb = hard_sign(q), hard_sign(k), hard_sign(v)
    probs = torch.softmax(qb @ kb.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1)
    a = core.prob_binarizer.value().detach()
    ones = torch.round((probs / a).clamp(0, 1))
    ones = torch.maximum(ones, (probs == probs.amax(-1, keepdim=True)).float())
    ab = a * ones
    differences = ab.sum(-1, keepdim=True) * vb if differential else 0
    expected = (core.shortcut.detach() * vb + ab @ vb - differences
                + core.local_weight.detach() * local_difference(vb, LAYOUT, "laplacian", "global"))
    assert torch.allclose(out.detach(), expected, atol=1e-5)


# ---------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter_of_didb_core_with_separate_hfsc() -> None:
    channels = 6
    qk_weight = torch.randn(2 * HEADS * HEAD_DIM, channels)
    core = make_core("didb", hfsc="separate", in_features=channels, qk_weight=qk_weight)
    assert core.hfsc == "separate" and core.high_projection is not None and len(core.high_projection) == 1
    assert torch.equal(core.high_projection[0].weight.detach(), qk_weight)
    core.train()
    x = torch.randn(2, TOKENS, channels, requires_grad=True)
    core.set_attention_input(x)
    q, k, v = qkv(grad=True)
    out = core(q, k, v)
    (out * torch.randn_like(out)).sum().backward()
    params = dict(core.named_parameters())
    assert {"prob_binarizer.scale", "band_weights", "shortcut", "local_weight", "high_projection.0.weight",
            "high_projection.0.input_binarizer.shift"} <= set(params)
    for name, param in params.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert (param.grad != 0).any(), name
    for name, tensor in (("q", q), ("k", k), ("v", v), ("x", x)):
        assert tensor.grad is not None and (tensor.grad != 0).any(), name


@pytest.mark.parametrize("variant", ["plain", "bit", "bivit"])
def test_gradients_reach_q_k_v_and_parameters_of_baselines(variant: str) -> None:
    core = make_core(variant).train()
    q, k, v = qkv(grad=True)
    out = core(q, k, v)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in core.named_parameters():
        assert param.grad is not None and (param.grad != 0).any(), name
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert tensor.grad is not None and (tensor.grad != 0).any(), name


# ---------------------------------------------------------------- HFSC


def test_hfsc_shared_scores_are_weighted_band_products() -> None:
    core = make_core("didb", hfsc="shared", hfsc_bands="one", prefix_tokens="zero")
    assert len(core.q_binarizers) == 2 and core.band_weights.shape == (2, HEADS, 1, 1)
    assert core.high_projection is None
    with torch.no_grad():
        core.band_weights.copy_(torch.tensor([0.7, 1.3]).reshape(2, 1, 1, 1))
    q, k, _ = qkv()
    from didbq.nn import split_tokens_into_bands

    q_low, q_high = split_tokens_into_bands(q, LAYOUT, "one", "zero")
    k_low, k_high = split_tokens_into_bands(k, LAYOUT, "one", "zero")
    expected = (0.7 * hard_sign(q_low) @ hard_sign(k_low).transpose(-2, -1)
                + 1.3 * hard_sign(q_high) @ hard_sign(k_high).transpose(-2, -1)) * 0.5
    assert torch.allclose(core.scores(q, k, 0.5), expected, atol=1e-6)


def test_hfsc_three_bands() -> None:
    core = make_core("didb", hfsc="separate", hfsc_bands="three", in_features=6)
    assert len(core.q_binarizers) == 4 and len(core.high_projection) == 3
    assert core.band_weights.shape == (4, HEADS, 1, 1)
    core.set_attention_input(torch.randn(2, TOKENS, 6))
    q, k, v = qkv()
    out = core(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    assert [name for name, _, _ in core.products()] == ["q·kᵀ low", "q·kᵀ band 1", "q·kᵀ band 2",
                                                        "q·kᵀ band 3", "attn·v"]


@pytest.mark.parametrize("bands", ["one", "three"])
def test_hfsc_fixed_band_weights_are_a_buffer(bands: str) -> None:
    core = make_core("didb", hfsc="shared", hfsc_bands=bands, hfsc_band_weights="fixed")
    count = 2 if bands == "one" else 4
    assert "band_weights" not in dict(core.named_parameters())
    assert torch.equal(core.state_dict()["band_weights"], torch.ones(count, HEADS, 1, 1))
    q, k, v = qkv()
    assert core(q, k, v).shape == v.shape


def test_hfsc_separate_without_attention_input_still_runs() -> None:
    core = make_core("didb", hfsc="separate", in_features=6)
    core.set_attention_input(None)
    q, k, v = qkv()
    assert core(q, k, v).shape == v.shape


# ---------------------------------------------------------------- data-aware initialisation


def test_bit_probability_scale_initialised_from_quantile() -> None:
    binarizer = ProbabilityBinarizer(3, "bit", 0.75, True).train()
    probs = torch.softmax(torch.randn(2, 3, 5, 5) * 2, dim=-1)
    binarizer(probs)
    assert bool(binarizer.initialised)
    per_head = probs.transpose(0, 1).reshape(3, -1)
    expected = 2 * torch.quantile(per_head, 0.75, dim=1)
    assert torch.allclose(binarizer.scale.detach().flatten(), expected)
    first = binarizer.scale.detach().clone()
    binarizer(torch.softmax(torch.randn(2, 3, 5, 5) * 9, dim=-1))
    assert torch.equal(binarizer.scale.detach(), first)  # not re-initialised


@pytest.mark.parametrize("kind", ["threshold", "bivit"])
def test_mask_probability_scale_initialised_from_selected_count(kind: str) -> None:
    binarizer = ProbabilityBinarizer(2, kind, 0.75, True).train()
    probs = torch.softmax(torch.randn(3, 2, 6, 6) * 2, dim=-1)
    binarizer(probs)
    mask = binarizer._mask(probs).float()
    expected = 1.0 / mask.sum(-1).transpose(0, 1).reshape(2, -1).mean(1)
    assert torch.allclose(binarizer.scale.detach().flatten(), expected)


def test_probability_scale_not_initialised_in_eval() -> None:
    binarizer = ProbabilityBinarizer(2, "bit", 0.75, True).eval()
    binarizer(torch.softmax(torch.randn(1, 2, 4, 4), dim=-1))
    assert not bool(binarizer.initialised)
    assert torch.equal(binarizer.scale.detach(), torch.ones(2, 1, 1))


def test_core_initialisation_is_saved_in_state_dict() -> None:
    core = make_core("bit").train()
    q, k, v = qkv()
    core(q, k, v)
    state = core.state_dict()
    assert bool(state["prob_binarizer.initialised"])
    assert bool(state["q_binarizers.0.initialised"]) and bool(state["v_binarizer.initialised"])
    # the scale is 2 x the 0.75 quantile of the softmax of the (now fixed) binary scores
    core.eval()
    probs = core.scores(q, k, HEAD_DIM ** -0.5).softmax(-1).detach()
    expected = 2 * torch.quantile(probs.transpose(0, 1).reshape(HEADS, -1), 0.75, dim=1)
    assert torch.allclose(core.prob_binarizer.scale.detach().flatten(), expected, atol=1e-6)
    fresh = make_core("bit")
    fresh.load_state_dict(state)
    assert bool(fresh.prob_binarizer.initialised)
    fresh.train()
    fresh(q * 10, k * 10, v * 10)
    assert torch.equal(fresh.prob_binarizer.scale.detach(), core.prob_binarizer.scale.detach())
    assert torch.equal(fresh.q_binarizers[0].scale.detach(), core.q_binarizers[0].scale.detach())


# ---------------------------------------------------------------- cross-attention, no grid, windows


def test_cross_attention_disables_diba_and_hfsc() -> None:
    core = make_core("didb", queries=4, keys=TOKENS, in_features=6)
    assert core.disabled_parts == ["diba", "local", "hfsc"]
    assert not core.diba and not core.use_local and core.hfsc == "off"
    assert core.shortcut is None and core.local_weight is None and core.band_weights is None
    assert core.high_projection is None and len(core.q_binarizers) == 1
    q, k, v = qkv(queries=4, keys=TOKENS)
    out = core(q, k, v)
    assert out.shape == (2, HEADS, 4, HEAD_DIM) and torch.isfinite(out).all()
    set_binarization(core, activations=False)
    assert torch.allclose(core(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_no_grid_disables_local_and_hfsc_but_keeps_diba() -> None:
    core = make_core("didb", queries=13)  # 12 grid cells: not square, no explicit grid
    assert core.disabled_parts == ["local", "hfsc"]
    assert core.diba and core.shortcut is not None and core.local_weight is None
    q, k, v = qkv(queries=13)
    assert core(q, k, v).shape == v.shape
    nonspatial = make_core("didb", layout=TokenLayout(spatial=False), queries=16)
    assert nonspatial.disabled_parts == ["local", "hfsc"]


def test_nothing_disabled_when_not_wanted() -> None:
    core = make_core("plain", queries=4, keys=TOKENS)
    assert core.disabled_parts == []


@pytest.mark.parametrize("hfsc", ["off", "shared", "separate"])
def test_windowed_five_dim_input(hfsc: str) -> None:
    layout = TokenLayout(grid=(2, 2))
    core = make_core("didb", layout=layout, queries=4, hfsc=hfsc).train()
    q = torch.randn(2, 3, HEADS, 4, HEAD_DIM, requires_grad=True)
    k = torch.randn(2, 3, HEADS, 4, HEAD_DIM)
    v = torch.randn(2, 3, HEADS, 4, HEAD_DIM)
    out = core(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad is not None
    products = core.products()
    assert products[0][1] == 2 * 3 * HEADS * 4 * 4 * HEAD_DIM
    if hfsc == "off":
        set_binarization(core, activations=False)
        assert torch.allclose(core(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_gqa_repeats_key_heads() -> None:
    core = make_core("plain", heads=4)
    set_binarization(core, activations=False)
    q = torch.randn(1, 4, TOKENS, HEAD_DIM)
    k = torch.randn(1, 2, TOKENS, HEAD_DIM)
    v = torch.randn(1, 2, TOKENS, HEAD_DIM)
    out = core(q, k, v, enable_gqa=True)
    # query heads 0, 1 share key head 0; query heads 2, 3 share key head 1
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    assert torch.allclose(out, expected, atol=1e-5)
    assert core.products()[0][1] == 4 * TOKENS * TOKENS * HEAD_DIM


# ---------------------------------------------------------------- products


def test_products_empty_before_a_call() -> None:
    assert make_core("didb").products() == []


@FAST
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), queries=st.integers(1, 6), keys=st.integers(1, 6),
       head_dim=st.integers(1, 5), value_dim=st.integers(1, 5))
def test_products_report_macs(batch: int, heads: int, queries: int, keys: int, head_dim: int,
                              value_dim: int) -> None:
    core = make_core("plain", heads=heads, head_dim=head_dim, layout=TokenLayout(spatial=False), queries=queries,
                     keys=keys)
    q = torch.randn(batch, heads, queries, head_dim)
    k = torch.randn(batch, heads, keys, head_dim)
    v = torch.randn(batch, heads, keys, value_dim)
    assert core(q, k, v).shape == (batch, heads, queries, value_dim)
    assert core.products() == [("q·kᵀ", batch * heads * queries * keys * head_dim, True),
                               ("attn·v", batch * heads * queries * keys * value_dim, True)]


def test_products_with_hfsc_and_disabled_activations() -> None:
    core = make_core("didb", hfsc="shared")
    q, k, v = qkv(batch=1)
    core(q, k, v)
    macs = HEADS * TOKENS * TOKENS * HEAD_DIM
    products = core.products()
    assert products == [("q·kᵀ low", macs, True), ("q·kᵀ band 1", macs, True), ("attn·v", macs, True)]
    assert sum(name.startswith("q·kᵀ") for name, _, _ in products) == 2
    set_binarization(core, activations=False)
    core(q, k, v)
    assert [binary for _, _, binary in core.products()] == [False, False, False]


def test_products_binary_flags_follow_each_binarizer() -> None:
    core = make_core("plain")
    q, k, v = qkv(batch=1)
    core(q, k, v)
    core.v_binarizer.enabled = False
    assert [binary for _, _, binary in core.products()] == [True, False]
    core.v_binarizer.enabled = True
    core.k_binarizers[0].enabled = False
    assert [binary for _, _, binary in core.products()] == [False, True]
    core.k_binarizers[0].enabled = True
    core.prob_binarizer.enabled = False
    assert [binary for _, _, binary in core.products()] == [True, False]
    identity = make_core("plain", v_binarizer="identity")
    assert isinstance(identity.v_binarizer, Identity)
    identity(q, k, v)
    assert [binary for _, _, binary in identity.products()] == [True, False]


# ---------------------------------------------------------------- the lineage's context shortcut (issue 13)


def test_context_shortcut_adds_full_precision_q_k_v_then_rprelu() -> None:
    core = make_core("didb", hfsc="off", output_norm=True, context_shortcut=True, context_act="rprelu").eval()
    with torch.no_grad():
        core.context_act.shift_in.normal_()
        core.context_act.shift_out.normal_()
    plain = make_core("didb", hfsc="off", output_norm=True).eval()
    plain.load_state_dict(core.state_dict(), strict=False)
    q, k, v = qkv()
    with torch.no_grad():
        expected = core.context_act(plain(q, k, v) + q + k + v)
        assert torch.equal(core(q, k, v), expected)


def test_context_shortcut_is_off_by_default_and_where_shapes_differ() -> None:
    assert not ATTENTION_VARIANTS["didb"].context_shortcut and ATTENTION_VARIANTS["didb"].context_act == "none"
    cross = make_core("plain", queries=3, keys=TOKENS, context_shortcut=True).eval()
    reference = make_core("plain", queries=3, keys=TOKENS).eval()
    reference.load_state_dict(cross.state_dict())
    q, k, v = qkv(queries=3, keys=TOKENS)
    with torch.no_grad():
        assert torch.equal(cross(q, k, v), reference(q, k, v))  # q is not the shape of k and v: nothing added


def test_the_score_tap_sees_scores_before_softmax() -> None:
    core = make_core("plain").eval()
    seen: dict[str, torch.Tensor] = {}
    _capture(core.score_tap, seen, "scores")
    q, k, v = qkv()
    core(q, k, v)
    assert torch.equal(seen["scores"], (hard_sign(q) * HEAD_DIM ** -0.5) @ hard_sign(k).transpose(-2, -1))


# ---------------------------------------------------------------- recompute in backward


def _saved_bytes(core: BinaryAttention, *inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run the core and count the bytes autograd keeps for backward."""
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = core(*inputs)
    return out, sum(saved)


def _run_with_gradients(recompute: bool | str, tokens: int, seed: int = 0) -> tuple[torch.Tensor, dict, int]:
    torch.manual_seed(seed)
    grid = int((tokens - 1) ** 0.5)
    channels = 6
    core = make_core("didb", hfsc="separate", in_features=channels, queries=tokens,
                     qk_weight=torch.randn(2 * HEADS * HEAD_DIM, channels), recompute=recompute).train()
    assert core.layout.grid_for(tokens) == (grid, grid)
    x = torch.randn(2, tokens, channels, requires_grad=True)
    core.set_attention_input(x)
    q, k, v = qkv(queries=tokens, grad=True)
    out, saved = _saved_bytes(core, q, k, v)
    core.set_attention_input(None)  # as the routed forward does: backward must not need it
    (out * torch.randn_like(out)).sum().backward()
    grads = {name: p.grad for name, p in core.named_parameters()} | {
        "q": q.grad, "k": k.grad, "v": v.grad, "x": x.grad}
    return out.detach(), grads, saved


@pytest.mark.parametrize("tokens", [10, 65])
def test_recompute_gives_the_same_outputs_and_gradients(tokens: int) -> None:
    out, grads, saved = _run_with_gradients(False, tokens)
    out_r, grads_r, saved_r = _run_with_gradients(True, tokens)
    assert torch.equal(out, out_r)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved_r < saved


def test_recompute_keeps_no_query_key_matrix() -> None:
    """With recompute the saved tensors grow with N (q, k, v, the input), without it with N^2."""
    per_token = {}
    for recompute in (False, True):
        sizes = [_run_with_gradients(recompute, tokens)[2] for tokens in (65, 257)]
        per_token[recompute] = sizes[1] / sizes[0]
    assert per_token[True] < 5  # 257 / 65 ~ 4: linear in N
    assert per_token[False] > 10  # ~ 16: quadratic in N


def test_recompute_auto_follows_the_query_key_count(monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core("didb", queries=65)
    q, k, _ = qkv(queries=65)
    assert core.options.recompute == "auto"
    assert not core._recomputes(q, k)
    monkeypatch.setattr("didbq.nn.attention.RECOMPUTE_AUTO_ENTRIES", 65 * 65 - 1)
    assert core._recomputes(q, k)
    with torch.no_grad():
        assert not core._recomputes(q, k)
    assert not make_core("didb", queries=65, recompute=False)._recomputes(q, k)


def test_recompute_keeps_dropout_and_the_first_batch_initialisation() -> None:
    """Backward reruns the core with the forward's random state and after the scale was set from the first
    batch: gradients equal those of the core without recompute."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(3)
        core = make_core("bit", recompute=recompute).train()
        q, k, v = qkv(grad=True)
        out = core(q, k, v, dropout_p=0.3)
        out.sum().backward()
        results.append((out.detach(), q.grad, core.prob_binarizer.scale.grad))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain)
