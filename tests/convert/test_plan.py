"""`plan` counts what method.md section 7 counts by hand, and reports every decision."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import didbq
from didbq.convert.recipe import PAPER_DIDB, parse_recipe
from didbq.convert.walker import convert
from didbq.errors import RecipeError, UnsupportedModelError

# method.md section 7, DeiT-S and DeiT-T at 224x224 with 1000 classes.
DEIT_S = {"bops": 4_540_695_552, "flops": 58_186_752, "ops": 129_135_120}
DEIT_T = {"bops": 1_224_589_824, "flops": 29_093_376, "ops": 48_227_592}


@pytest.fixture(scope="module")
def deit_small_xnor() -> didbq.convert.Plan:
    return didbq.plan(didbq.build_model("deit_small_patch16_224"), "xnor")


def test_deit_small_baseline_matches_the_hand_count(deit_small_xnor) -> None:
    totals = deit_small_xnor.totals
    for key, expected in DEIT_S.items():
        assert getattr(totals, key) == pytest.approx(expected, rel=0.01), key
    assert totals.fp_reference_flops == pytest.approx(4.6e9, rel=0.01)


def test_deit_small_packed_size_is_the_analytic_size(deit_small_xnor) -> None:
    totals = deit_small_xnor.totals
    assert totals.packed_bytes == pytest.approx(6.1e6, rel=0.01)
    assert totals.fp32_bytes == pytest.approx(88.2e6, rel=0.01)
    assert totals.binary_parameters == 12 * 384 * (1152 + 384 + 1536 + 1536)


def test_deit_tiny_baseline_matches_the_hand_count() -> None:
    totals = didbq.plan(didbq.build_model("deit_tiny_patch16_224"), "xnor").totals
    for key, expected in DEIT_T.items():
        assert getattr(totals, key) == pytest.approx(expected, rel=0.01), key


def test_didb_reports_the_extra_bops_of_hfsc(deit_small_xnor) -> None:
    didb = didbq.plan(didbq.build_model("deit_small_patch16_224"), PAPER_DIDB)
    tokens, dim, heads = 197, 384, 6
    high_band_projection = tokens * dim * 2 * dim
    high_band_product = heads * tokens * tokens * (dim // heads)
    assert didb.totals.bops - deit_small_xnor.totals.bops == 12 * (high_band_projection + high_band_product)
    assert didb.totals.flops == deit_small_xnor.totals.flops
    # the extra products are the method's, so the full-precision reference is unchanged
    assert didb.totals.fp_reference_flops == deit_small_xnor.totals.fp_reference_flops
    added = [layer.name for layer in didb.layers if layer.added_by_method]
    assert len(added) == 24 and all("binary_core" in n or "band" in n for n in added)


def test_plan_lists_every_decision_with_a_reason(deit_small_xnor) -> None:
    data = deit_small_xnor.as_dict()
    assert len(data["replaced"]) == 48 and {r["rule"] for r in data["replaced"]} == {"block linears"}
    assert len(data["attention"]) == 12 and {a["route"] for a in data["attention"]} == {"sdpa"}
    reasons = {k["name"]: k["reason"] for k in data["full_precision"]}
    assert reasons["patch_embed.proj"] == "patch embedding"
    assert reasons["head"] == "classifier head"
    assert reasons["blocks.0.norm1"] == "normalisation"
    assert reasons["(model)"] == "tokens and position embeddings"


class HandWrittenAttention(nn.Module):
    """Single-head softmax attention computed by hand on [B, N, C], in no timm family."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v)


class UnknownAttention(HandWrittenAttention):
    """Linear attention: (q kᵀ) v without a softmax, which neither route fits."""

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(-2, -1)) @ v / x.shape[1])


class GateAttention(nn.Module):
    """Squeeze-and-excitation named attention: a gate, no product of activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x * self.fc(x.mean(1, keepdim=True)).sigmoid()


def _with(attention: type[nn.Module]) -> nn.Module:
    model = didbq.build_model("test_vit")
    model.blocks[0].attn = attention(model.embed_dim)
    return model


def test_a_hand_written_softmax_attention_takes_the_explicit_route() -> None:
    model = _with(HandWrittenAttention)
    conversion = convert(model, "xnor")
    routes = {a.name: (a.route, a.family, a.heads, a.queries) for a in conversion.attention}
    assert routes["blocks.0.attn"] == ("explicit", "test_plan", 1, 101)  # test_vit: 160 px, patch 16, 1 prefix
    assert routes["blocks.1.attn"][0] == "sdpa"
    core = model.blocks[0].attn.binary_core
    core.last_call = None
    model(conversion.example_input)
    assert core.last_call is not None  # the converted forward still goes through the core


def test_strict_mode_names_an_attention_class_that_no_route_fits() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        convert(_with(UnknownAttention), "xnor")
    message = str(error.value)
    assert "blocks.0.attn" in message and "UnknownAttention" in message and "--no-strict" in message


def test_a_gate_named_attention_stays_full_precision_with_its_linears_binary() -> None:
    conversion = convert(_with(GateAttention), "xnor")
    assert "blocks.0.attn" not in {a.name for a in conversion.attention}
    assert "without products of activations" in {k.name: k.reason for k in conversion.kept}["blocks.0.attn"]
    assert "blocks.0.attn.fc" in {s.name for s in conversion.swaps}


def test_non_strict_mode_binarizes_the_linears_of_an_unknown_attention() -> None:
    with pytest.warns(UserWarning, match="UnknownAttention"):
        conversion = convert(_with(UnknownAttention), "xnor", strict=False)
    swapped = {s.name for s in conversion.swaps}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj"} <= swapped
    assert "blocks.0.attn" not in {a.name for a in conversion.attention}
    assert "unsupported attention class" in {k.name: k.reason for k in conversion.kept}["blocks.0.attn"]


UNMATCHED_RULE = parse_recipe("""
name: unmatched
binarize:
  rules:
    - {targets: [Linear], into: binary_linear}
    - {name: conv rule, targets: [Conv3d], into: identity}
""")


def test_a_rule_that_matches_nothing_warns_or_fails_with_strict_rules() -> None:
    conversion = convert(didbq.build_model("test_vit"), UNMATCHED_RULE)
    assert conversion.warnings == ["rule 'conv rule' matches no module of VisionTransformer"]
    with pytest.raises(RecipeError, match="conv rule"):
        convert(didbq.build_model("test_vit"), UNMATCHED_RULE, strict_rules=True)


def test_an_optional_rule_that_matches_nothing_is_silent() -> None:
    """The built-in recipes' convolution rule is for hybrids: a pure ViT converts without a warning."""
    optional = parse_recipe("""
name: optional
binarize:
  rules:
    - {targets: [Linear], into: binary_linear}
    - {name: conv rule, targets: [Conv3d], into: identity, optional: true}
""")
    assert convert(didbq.build_model("test_vit"), optional, strict_rules=True).warnings == []
    assert convert(didbq.build_model("test_vit"), "didb", strict_rules=True).warnings == []


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(UnsupportedModelError, match="did you mean .*deit_small_patch16_224"):
        didbq.build_model("deit_smal_patch16_224")


def test_binarize_model_returns_the_same_module_converted_in_place() -> None:
    model = didbq.build_model("test_vit")
    assert didbq.binarize_model(model, "didb") is model
    assert type(model.blocks[0].attn).__name__ == "BinarizedAttention"
