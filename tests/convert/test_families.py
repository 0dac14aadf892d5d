"""The compatibility matrix: real timm models from every supported family, converted with the DIDB recipe.

For each model: conversion succeeds, every remaining nn.Linear is a documented full-precision module, every
attention module runs the recipe's core, forward and backward run with finite outputs and every trainable
parameter gets a gradient. A second check converts with binarization switched off and requires the converted
model to compute exactly what timm's model computes: that proves each adapter and the SDPA route are faithful.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import didbq
from didbq.convert.adapters import ADAPTERS, class_key
from didbq.convert.recipe import parse_recipe
from didbq.convert.routing import CORE_ATTRIBUTE, original_class
from didbq.convert.walker import convert
from didbq.nn import BinaryAttention, set_binarization

MODELS = [
    ("test_vit", {}),
    ("test_vit2", {}),
    ("test_vit3", {}),
    ("test_vit4", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("deit3_small_patch16_224", {"depth": 4, "img_size": 112}),
    ("vit_relpos_small_patch16_224", {"depth": 4, "img_size": 112}),
    ("swin_tiny_patch4_window7_224", {"img_size": 128, "window_size": 4, "depths": (2, 2, 2, 2)}),
    ("swinv2_tiny_window8_256", {"img_size": 128, "window_size": 4, "depths": (2, 2, 2, 2)}),
    ("swinv2_cr_tiny_ns_224", {"img_size": 128, "window_size": 4, "depths": (2, 2, 2, 2)}),
    ("beit_base_patch16_224", {"depth": 2, "embed_dim": 192, "num_heads": 3}),
    ("eva02_tiny_patch14_224.mim_in22k", {"depth": 4}),
    ("cait_xxs24_224", {"depth": 4, "img_size": 112}),
    ("xcit_nano_12_p16_224", {"depth": 4, "img_size": 112}),
    ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}),
    ("twins_svt_small", {"depths": (2, 1, 2, 1)}),
    ("crossvit_tiny_240", {}),
    # found by what they do: the SDPA route (a fused branch) or the explicit route (softmax(q kᵀ) v by hand)
    ("levit_128s", {}),
    ("levit_conv_128s", {}),  # v @ probsᵀ: the transposed layout
    ("mvitv2_tiny", {}),
    ("efficientformer_l1", {"depths": (1, 1, 1, 2)}),
    ("efficientformerv2_s0", {"depths": (1, 1, 2, 2)}),
    ("tiny_vit_5m_224", {"depths": (1, 1, 1, 1)}),
    ("hiera_tiny_224", {"stages": (1, 1, 1, 1)}),
    ("gcvit_xxtiny", {}),
    ("edgenext_xx_small", {"depths": (1, 1, 1, 1)}),
    ("tnt_s_patch16_224", {"depth": 2}),
    ("volo_d1_224", {}),
    ("davit_tiny", {"depths": (1, 1, 1, 1)}),
    ("samvit_base_patch16", {"img_size": 256, "depth": 2, "embed_dim": 192, "num_heads": 3,
                             "global_attn_indexes": (1,)}),
    ("efficientvit_m0", {"drop_path_rate": None}),  # it takes no drop_path_rate
    ("nest_tiny", {"img_size": 112}),
    ("visformer_tiny", {"depth": (1, 1, 1)}),
    ("mobilevit_xxs", {}),
    ("convit_tiny", {"depth": 4, "local_up_to_layer": 2}),  # gated positional softmax beside the scores
]

DOCUMENTED_FP_REASONS = {"patch embedding", "patch merging between stages", "classifier head",
                         "attention-pooling head", "never runs in forward"}


def _build(name: str, kwargs: dict) -> nn.Module:
    kwargs = {key: value for key, value in {"drop_path_rate": 0.0, **kwargs}.items() if value is not None}
    return didbq.build_model(name, pretrained=False, **kwargs)


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m for m, _ in MODELS])
def test_didb_conversion_trains(name: str, kwargs: dict) -> None:
    model = _build(name, kwargs)
    conversion = convert(model, "didb")
    recipe_core = conversion.recipe.attention.resolve()

    kept = {k.name: k.reason for k in conversion.kept}
    for module_name, module in model.named_modules():
        if type(module) is nn.Linear:
            assert module_name in kept, f"{module_name} stayed nn.Linear without a recorded reason"
            assert "no rule" not in kept[module_name]
        if class_key(original_class(module)) in ADAPTERS:
            core = getattr(module, CORE_ATTRIBUTE)
            assert isinstance(core, BinaryAttention) and core.options == recipe_core
    assert conversion.attention, "no attention module was converted"

    model.train()
    x = torch.randn(2, *conversion.example_input.shape[1:])
    out = _output(model, x)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"


FP_EQUIVALENCE = parse_recipe("""
name: fp-equivalence
binarize:
  rules: [{targets: [Linear], into: binary_linear, options: {input_binarizer: sign, shortcut: false}}]
  ignore:
    - {target: "re:^(head|head_dist)(\\\\.|$)", reason: classifier head}
attention: {variant: didb, hfsc: "off", local: "off"}
""")


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m for m, _ in MODELS])
def test_converted_model_in_full_precision_mode_equals_timm(name: str, kwargs: dict) -> None:
    model = _build(name, kwargs).eval()
    reference = copy.deepcopy(model)
    conversion = convert(model, FP_EQUIVALENCE)
    set_binarization(model, weights=False, activations=False)
    with torch.no_grad():
        expected = _output(reference, conversion.example_input)
        actual = _output(model, conversion.example_input)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
