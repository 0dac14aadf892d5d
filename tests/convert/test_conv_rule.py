"""The binary_conv2d replacement: its options, depthwise convolutions kept by default, and a hybrid timm model
converted by a recipe with a binary_conv2d rule."""
from __future__ import annotations

import pytest
import torch
from convmodels import ARGS, MODEL, conv_recipe
from torch import nn

import didbq
from didbq.convert import REPLACEMENTS
from didbq.convert.replacements import SeenInput
from didbq.convert.walker import convert
from didbq.errors import RecipeError
from didbq.nn import BinaryConv2d, BinaryLinear, ChannelRPReLU, set_binarization

REPLACEMENT = REPLACEMENTS["binary_conv2d"]


def _build(conv: nn.Conv2d, **options: object) -> nn.Module:
    return REPLACEMENT.build(conv, (1, conv.in_channels, 8, 8), REPLACEMENT.options.model_validate(options))


def _kept(conv: nn.Conv2d, size: int = 8, is_model_input: bool = False, **options: object) -> str | None:
    seen = SeenInput((2, conv.in_channels, size, size), torch.device("cpu"), torch.float32, is_model_input)
    return REPLACEMENT.keeps(conv, seen, REPLACEMENT.options.model_validate(options))


def test_depthwise_convolutions_stay_full_precision_unless_asked() -> None:
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert _kept(depthwise) == "depthwise convolution (binary_conv2d depthwise: keep)"
    assert _kept(depthwise, depthwise="binary") is None
    binary = _build(depthwise, depthwise="binary")
    assert isinstance(binary, BinaryConv2d) and binary.groups == 8 and binary.depthwise
    assert _kept(nn.Conv2d(8, 8, 3, groups=2)) is None  # grouped, not depthwise: replaced


def test_the_convolution_reading_the_image_and_pooled_gates_stay_full_precision_unless_asked() -> None:
    conv = nn.Conv2d(8, 16, 1)
    assert _kept(conv, is_model_input=True) == "reads the input image (binary_conv2d image_input: keep)"
    assert _kept(conv, is_model_input=True, image_input="binary") is None
    assert _kept(conv, size=1) == "gate on globally pooled 1x1 maps (binary_conv2d pooled: keep)"
    assert _kept(conv, size=1, pooled="binary") is None
    assert _kept(conv) is None


def test_options_reach_the_layer() -> None:
    layer = _build(nn.Conv2d(8, 8, 3, padding=1), input_binarizer="bit_signed", surrogate="ste", shortcut=True,
                   norm="batchnorm", act="rprelu")
    assert layer.shortcut and isinstance(layer.norm, nn.BatchNorm2d) and isinstance(layer.act, ChannelRPReLU)
    assert layer.input_binarizer.scale.shape == (8,)
    assert REPLACEMENT.accepts == (nn.Conv2d,)


@pytest.mark.parametrize("options, problem", [
    ({"act": "token_rprelu"}, "options.act"), ({"depthwise": "half"}, "options.depthwise"),
    ({"input_binarizer": "tanh"}, "unknown activation binarizer"), ({"norm": "groupnorm"}, "options.norm"),
    ({"input_binarizer": "sign", "threshold_init": "mean"}, "needs a binarizer with a learnable threshold"),
    ({"pooled": "drop"}, "options.pooled")])
def test_bad_options_are_recipe_errors(options: dict, problem: str) -> None:
    with pytest.raises(RecipeError, match=problem):
        conv_recipe(**options)


def test_a_hybrid_model_converts_and_switches_with_the_stages() -> None:
    model = didbq.build_model(MODEL, **ARGS)
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    conversion = convert(model, conv_recipe(norm="batchnorm", act="rprelu"))
    modules = dict(model.named_modules())
    binary = {name for name, m in modules.items() if isinstance(m, BinaryConv2d)}
    depthwise = {name for name, m in originals.items() if m.groups == m.in_channels > 1}
    kept = {name for name in originals if name.startswith("stem.") or ".se." in name} | depthwise
    assert binary and binary == set(originals) - kept
    assert all(modules[name] is originals[name] for name in kept)  # the same modules, untouched
    assert any(isinstance(m, BinaryLinear) for m in modules.values()) and conversion.attention
    set_binarization(model, weights=False, activations=False)
    assert not any(modules[name].binarize_weights or modules[name].inputs_binary for name in binary)
    set_binarization(model)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


def test_binary_convolutions_after_a_relu_see_both_signs() -> None:
    """efficientformer's MLPs read a ReLU's output (>= 0): with the threshold at 0 every binary input would be +1,
    a constant product that the BatchNorm after it turns into exploding gradients. didb starts the threshold at
    the first training batch's mean, so every binary convolution sees both signs."""
    torch.manual_seed(0)
    model = didbq.build_model("efficientformer_l1", pretrained=False, depths=(1, 1, 1, 2))
    conversion = convert(model, "didb")
    fractions = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            fractions.setdefault(name, (out > 0).float().mean().item())
        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    for name, layer in layers.items():
        layer.input_binarizer.register_forward_hook(record(name))
    model.train()
    images = torch.randn(4, *conversion.example_input.shape[1:])
    model(images).logsumexp(-1).mean().backward()
    assert layers and set(fractions) == set(layers)
    assert all(0.05 < plus < 0.95 for plus in fractions.values()), fractions
    assert all(torch.isfinite(layer.weight.grad).all() for layer in layers.values())
