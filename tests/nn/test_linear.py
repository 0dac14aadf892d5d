"""BinaryLinear: binary weights and inputs, full-precision mode, the ReActNet/BinaryViT shortcut."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from didbq.nn import BinaryLinear, RPReLU, binarize_weight, hard_sign, set_binarization
from didbq.nn.binarizers import BiTSigned, Identity, RSign
from didbq.nn.linear import add_shortcut, widths_match

FAST = settings(max_examples=25, deadline=None)


def _values(t: torch.Tensor) -> set[float]:
    return set(t.detach().flatten().tolist())


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_copies_weight_and_bias(bias: bool) -> None:
    linear = nn.Linear(6, 4, bias=bias)
    layer = BinaryLinear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (6, 4)
    assert torch.equal(layer.weight.detach(), linear.weight.detach())
    if bias:
        assert torch.equal(layer.bias.detach(), linear.bias.detach())
    else:
        assert layer.bias is None
    # a copy, not a shared tensor
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(layer.weight.detach(), linear.weight.detach())


def test_from_linear_keeps_dtype() -> None:
    linear = nn.Linear(4, 8).double()
    layer = BinaryLinear.from_linear(linear)
    assert layer.weight.dtype == torch.float64
    assert layer.input_binarizer.shift.dtype == torch.float64
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


@FAST
@given(in_features=st.integers(1, 8), out_features=st.integers(1, 8), batch=st.integers(1, 3),
       bias=st.booleans(), binarizer=st.sampled_from(["rsign", "sign", "bit_signed"]))
def test_full_precision_mode_equals_linear(in_features: int, out_features: int, batch: int, bias: bool,
                                           binarizer: str) -> None:
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = BinaryLinear.from_linear(linear, input_binarizer=binarizer)
    set_binarization(layer, weights=False, activations=False)
    assert not layer.binarize_weights and not layer.input_binarizer.enabled
    assert not layer.inputs_binary
    x = torch.randn(batch, 3, in_features)
    assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.effective_weight(), layer.weight)


@FAST
@given(in_features=st.integers(1, 8), out_features=st.integers(1, 8), batch=st.integers(1, 3))
def test_binary_mode_is_sign_inputs_times_scaled_sign_weights(in_features: int, out_features: int,
                                                              batch: int) -> None:
    linear = nn.Linear(in_features, out_features)
    layer = BinaryLinear.from_linear(linear)
    with torch.no_grad():
        layer.input_binarizer.shift.copy_(torch.randn(in_features) * 0.3)
    assert layer.binarize_weights and layer.inputs_binary
    x = torch.randn(batch, 2, in_features)
    # recompute by hand: inputs sign(x + b), weights sign(W - rowmean W) * rowmean|W|
    inputs = hard_sign(x + layer.input_binarizer.shift.detach())
    assert _values(inputs) <= {-1.0, 1.0}
    assert torch.equal(layer.input_binarizer(x).detach(), inputs)
    w = linear.weight.detach()
    signs = hard_sign(w - w.mean(dim=1, keepdim=True))
    scale = w.abs().mean(dim=1, keepdim=True)
    assert _values(signs) <= {-1.0, 1.0}
    assert torch.allclose(layer.effective_weight().detach(), signs * scale)
    expected = F.linear(inputs, signs * scale, linear.bias.detach())
    assert torch.allclose(layer(x).detach(), expected, atol=1e-6)


def test_binary_product_inputs_are_plus_minus_one_via_hook() -> None:
    layer = BinaryLinear(5, 3)
    seen = []
    layer.input_binarizer.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    layer(torch.randn(4, 5) * 3)
    assert len(seen) == 1
    assert _values(seen[0]) == {-1.0, 1.0}


def test_weights_only_mode() -> None:
    # stage 1 of two-stage training: binary weights, full-precision inputs
    linear = nn.Linear(6, 4)
    layer = BinaryLinear.from_linear(linear)
    set_binarization(layer, weights=True, activations=False)
    x = torch.randn(3, 6)
    signs, scale = binarize_weight(linear.weight.detach())
    assert torch.allclose(layer(x).detach(), F.linear(x, signs * scale, linear.bias.detach()), atol=1e-6)


def test_identity_input_binarizer_is_not_binary() -> None:
    layer = BinaryLinear(4, 4, input_binarizer="identity")
    assert isinstance(layer.input_binarizer, Identity)
    assert not layer.inputs_binary
    assert isinstance(BinaryLinear(4, 4, input_binarizer="bit_signed").input_binarizer, BiTSigned)
    assert isinstance(BinaryLinear(4, 4).input_binarizer, RSign)


# ---------------------------------------------------------------- the shortcut


def test_shortcut_repeats_when_widening_and_group_averages_when_narrowing() -> None:
    x = torch.arange(6.0).reshape(1, 6)
    assert torch.equal(add_shortcut(torch.zeros(1, 6), x), x)
    assert torch.equal(add_shortcut(torch.zeros(1, 12), x), torch.cat([x, x], dim=-1))
    # narrowing averages the groups of channels j, j + width, ...: the left inverse of widening
    assert torch.equal(add_shortcut(torch.zeros(1, 3), x), (x[..., :3] + x[..., 3:]) / 2)
    z, y = torch.randn(2, 5, 4), torch.randn(2, 5, 12)
    assert torch.allclose(add_shortcut(y, z), y + z.repeat(1, 1, 3))
    assert torch.allclose(add_shortcut(torch.zeros(2, 5, 4), add_shortcut(torch.zeros(2, 5, 12), z)), z)
    assert not widths_match(6, 4) and widths_match(4, 12) and widths_match(12, 4)


@pytest.mark.parametrize("in_features, out_features", [(4, 12), (8, 8), (12, 4), (6, 3)])
def test_shortcut_form(in_features: int, out_features: int) -> None:
    act = RPReLU(out_features)
    layer = BinaryLinear(in_features, out_features, shortcut=True, norm="layernorm", act=act)
    assert layer.shortcut
    with torch.no_grad():
        layer.norm.weight.copy_(torch.rand(out_features) + 0.5)
        layer.norm.bias.copy_(torch.randn(out_features))
        act.shift_in.copy_(torch.randn(out_features) * 0.1)
        act.shift_out.copy_(torch.randn(out_features) * 0.1)
    x = torch.randn(2, 3, in_features)
    inputs = hard_sign(x + layer.input_binarizer.shift.detach())
    signs, scale = binarize_weight(layer.weight.detach())
    binary = F.linear(inputs, signs * scale, layer.bias.detach())
    normed = F.layer_norm(binary, (out_features,), layer.norm.weight.detach(), layer.norm.bias.detach())
    if out_features >= in_features:
        skip = x.repeat(1, 1, out_features // in_features)
    else:
        skip = x.reshape(2, 3, in_features // out_features, out_features).mean(dim=-2)
    expected = act(normed + skip).detach()
    assert torch.allclose(layer(x).detach(), expected, atol=1e-5)


def test_shortcut_off_for_non_dividing_widths() -> None:
    layer = BinaryLinear(4, 6, shortcut=True)
    assert layer.shortcut is False
    x = torch.randn(2, 4)
    inputs = hard_sign(x)
    signs, scale = binarize_weight(layer.weight.detach())
    assert torch.allclose(layer(x).detach(), F.linear(inputs, signs * scale, layer.bias.detach()), atol=1e-6)
    assert BinaryLinear(6, 4, shortcut=True).shortcut is False
    assert BinaryLinear(4, 8, shortcut=True).shortcut is True
    assert BinaryLinear(8, 4, shortcut=True).shortcut is True
    assert BinaryLinear(4, 8, shortcut=False).shortcut is False


def test_shortcut_in_full_precision_mode() -> None:
    linear = nn.Linear(4, 8)
    layer = BinaryLinear.from_linear(linear, shortcut=True)
    set_binarization(layer, weights=False, activations=False)
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), linear(x) + x.repeat(1, 2))


def test_gradients_reach_all_parameters() -> None:
    act = RPReLU(8)
    layer = BinaryLinear(4, 8, shortcut=True, norm="layernorm", act=act)
    x = torch.randn(5, 4, requires_grad=True)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "bias", "input_binarizer.shift", "norm.weight", "norm.bias",
                          "act.shift_in", "act.slope", "act.shift_out"}
    for name, param in names.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert (param.grad != 0).any(), name
    assert x.grad is not None and (x.grad != 0).any()


def test_extra_repr_reports_modes() -> None:
    layer = BinaryLinear(4, 8, shortcut=True)
    assert "weights=binary" in repr(layer) and "inputs=binary" in repr(layer) and "shortcut=True" in repr(layer)
    set_binarization(layer, weights=False, activations=False)
    assert "weights=fp" in repr(layer) and "inputs=fp" in repr(layer)


@pytest.mark.parametrize("binarizer", ["rsign", "bit_signed", "identity"])
def test_scaled_sign_product_has_the_gradients_of_the_plain_product(binarizer: str) -> None:
    """(x @ signsᵀ) * scale + bias is F.linear(x, signs * scale, bias) computed so that ±1 inputs give an exact
    integer before the one multiply; forward and every gradient agree with the plain form."""
    torch.manual_seed(1)
    layer = BinaryLinear.from_linear(nn.Linear(24, 12), input_binarizer=binarizer)
    x = torch.randn(5, 3, 24, requires_grad=True)
    layer.train()
    layer(x).square().sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    signs, scale = binarize_weight(layer.weight)
    F.linear(layer.input_binarizer(x), signs * scale, layer.bias).square().sum().backward()
    plain = [x.grad] + [p.grad for p in layer.parameters()]
    for got, expected in zip(ours, plain):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_binary_products_of_sign_inputs_are_exact_integers_times_the_scale() -> None:
    layer = BinaryLinear(300, 7, bias=False)
    x = torch.randn(4, 300)
    signs, scale = layer.binary_weight()
    integers = (hard_sign(x + layer.input_binarizer.shift).long() @ signs.long().T).float()
    assert torch.equal(layer(x).detach(), integers * scale.reshape(-1))
