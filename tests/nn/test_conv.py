"""BinaryConv2d: binary weights and inputs over feature maps, full-precision mode, the stage switches, gradients,
convolution geometry and the shortcut's shape rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, LayerNorm2d, StdConv2d
from torch import nn

from didbq.errors import DidbqError
from didbq.nn import BinaryConv2d, ChannelRPReLU, RPReLU, hard_sign, set_binarization
from didbq.nn.binary import _ScaledSign

# (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [
    (8, 16, 1, 1, 0, 1, 1, True),  # 1x1 projection (levit_conv, efficientformer, MBConv)
    (6, 6, 3, 1, 1, 1, 1, False),
    (8, 16, 3, 2, 1, 1, 2, True),  # grouped, strided
    (8, 8, 3, 2, 1, 1, 8, True),  # depthwise, strided (MBConv's conv2_kxk)
    (4, 8, 4, 4, 0, 1, 1, True),  # pvt_v2's spatial-reduction conv (kernel = stride)
    (6, 12, 3, 1, 2, 2, 3, False),  # dilated
    (5, 7, (3, 1), (1, 2), (1, 0), 1, 1, True),  # rectangular
]


def _conv(geometry: tuple) -> nn.Conv2d:
    channels, out, kernel, stride, padding, dilation, groups, bias = geometry
    return nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias)


def _shifted(layer: BinaryConv2d) -> BinaryConv2d:
    with torch.no_grad():
        layer.input_binarizer.shift.copy_(torch.randn(layer.in_channels) * 0.3)
    return layer


def _by_hand(layer: BinaryConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sign(x + b) per channel, signs of each output channel's centred weights, that channel's mean|W|)."""
    inputs = hard_sign(x + layer.input_binarizer.shift.detach().view(1, -1, 1, 1))
    w = layer.weight.detach()
    signs = hard_sign(w - w.mean(dim=(1, 2, 3), keepdim=True))
    return inputs, signs, w.abs().mean(dim=(1, 2, 3))


def _conv_with(layer: BinaryConv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("binarizer", ["rsign", "sign", "bit_signed"])
def test_full_precision_mode_equals_conv2d(geometry: tuple, binarizer: str) -> None:
    conv = _conv(geometry)
    layer = BinaryConv2d.from_conv(conv, input_binarizer=binarizer)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) == (
        conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(layer.weight.detach(), conv.weight.detach()) and (layer.bias is None) == (conv.bias is None)
    set_binarization(layer, weights=False, activations=False)
    assert not layer.binarize_weights and not layer.input_binarizer.enabled and not layer.inputs_binary
    x = torch.randn(2, conv.in_channels, 9, 10)
    assert torch.equal(layer(x), conv(x))
    assert torch.equal(layer.effective_weight(), layer.weight)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_binary_mode_is_an_exact_sign_convolution_times_the_channel_scale(geometry: tuple) -> None:
    layer = _shifted(BinaryConv2d.from_conv(_conv(geometry)))
    assert layer.binarize_weights and layer.inputs_binary
    x = torch.randn(2, layer.in_channels, 9, 10)
    inputs, signs, scale = _by_hand(layer, x)
    assert torch.allclose(layer.effective_weight().detach(), signs * scale.view(-1, 1, 1, 1))
    integers = _conv_with(layer, inputs.double(), signs.double(), None).float()  # exact in float64
    expected = integers * scale.view(-1, 1, 1)
    if layer.bias is not None:
        expected = expected + layer.bias.detach().view(-1, 1, 1)
    assert torch.equal(layer(x).detach(), expected)


def test_the_stage_switches_act_on_weights_and_inputs_separately() -> None:
    conv = nn.Conv2d(6, 4, 3, padding=1)
    layer = _shifted(BinaryConv2d.from_conv(conv))
    x = torch.randn(2, 6, 5, 5)
    inputs, signs, scale = _by_hand(layer, x)
    binary_weight = signs * scale.view(-1, 1, 1, 1)
    set_binarization(layer, weights=True, activations=False)  # stage 1 of two: binary weights, fp inputs
    assert layer.binarize_weights and not layer.inputs_binary
    assert torch.allclose(layer(x).detach(), _conv_with(layer, x, binary_weight, conv.bias.detach()), atol=1e-5)
    set_binarization(layer, weights=False, activations=True)
    assert torch.allclose(layer(x).detach(), conv(inputs).detach(), atol=1e-6)
    set_binarization(layer, weights=True, activations=True)
    assert torch.allclose(layer(x).detach(), _conv_with(layer, inputs, binary_weight, conv.bias.detach()),
                          atol=1e-5)


@pytest.mark.parametrize("binarizer", ["rsign", "bit_signed", "identity"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[2], GEOMETRIES[5]])
def test_gradients_equal_those_of_the_plain_binary_convolution(binarizer: str, geometry: tuple) -> None:
    """The scaled-sign product's own backward gives the latent weight (through the sign and the scale), the
    input binarizer's threshold and scale, the bias and the input what autograd gives for conv(x_b, s * a)."""
    layer = BinaryConv2d.from_conv(_conv(geometry), input_binarizer=binarizer).train()
    x = torch.randn(3, layer.in_channels, 8, 7, requires_grad=True)
    layer(x).square().sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    signs, scale = layer.binary_weight()
    plain = _conv_with(layer, layer.binarize_inputs(x), signs * scale.view(-1, 1, 1, 1), layer.bias)
    plain.square().sum().backward()
    expected = [x.grad] + [p.grad for p in layer.parameters()]
    assert len(ours) == len(expected) >= 2
    for got, want in zip(ours, expected):
        assert (got != 0).any() and torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("geometry", [GEOMETRIES[2], GEOMETRIES[3], GEOMETRIES[6]])
def test_scaled_sign_product_passes_gradcheck(geometry: tuple) -> None:
    """Every gradient of conv(x, signs) * scale + bias (input, signs, per-channel scale, bias), numerically."""
    layer = BinaryConv2d.from_conv(_conv(geometry)).double()
    x = torch.randn(2, layer.in_channels, 6, 5, dtype=torch.float64, requires_grad=True)
    signs = torch.randn_like(layer.weight, requires_grad=True)
    scale = torch.rand(layer.out_channels, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(layer.out_channels, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: _ScaledSign.apply(*args, layer), (x, signs, scale, bias))


@pytest.mark.parametrize("surrogate", ["approx_sign", "ste"])
def test_the_surrogate_gradient_reaches_the_input_and_threshold_only_near_the_threshold(surrogate: str) -> None:
    layer = _shifted(BinaryConv2d(4, 4, 3, padding=1, surrogate=surrogate))
    x = torch.randn(2, 4, 6, 6, requires_grad=True) * 1.5
    x.retain_grad()
    layer(x).sum().backward()
    far = (x + layer.input_binarizer.shift.view(1, -1, 1, 1)).abs().detach() > 1
    assert far.any() and (~far).any()
    assert (x.grad[far] == 0).all() and (x.grad[~far] != 0).any()
    assert (layer.input_binarizer.shift.grad != 0).all() and (layer.weight.grad != 0).any()


# ---------------------------------------------------------------- geometry, modules, refusals


def test_timm_conv2d_same_pads_after_binarizing_like_tf_same() -> None:
    conv = Conv2dSame(4, 4, 3, stride=2, groups=4)
    layer = _shifted(BinaryConv2d.from_conv(conv, shortcut=True))
    assert layer.same and not layer.shortcut and "stride (2, 2)" in layer.shortcut_note
    x = torch.randn(1, 4, 7, 8)
    set_binarization(layer, weights=False, activations=False)
    assert torch.equal(layer(x), conv(x))
    set_binarization(layer, weights=True, activations=True)
    inputs, signs, scale = _by_hand(layer, x)
    padded = F.pad(inputs, (0, 1, 1, 1))  # TF SAME for 8 wide, 7 high, kernel 3, stride 2: zeros, not +1
    expected = F.conv2d(padded, signs * scale.view(-1, 1, 1, 1), conv.bias.detach(), 2, 0, 1, 4)
    assert torch.allclose(layer(x).detach(), expected, atol=1e-5)


@pytest.mark.parametrize("conv, problem", [
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (StdConv2d(4, 4, 3), "computes its own forward"),
    (nn.Conv2d(4, 4, 2, padding="same"), "pads unevenly"),
])
def test_convolutions_it_cannot_reproduce_are_refused(conv: nn.Conv2d, problem: str) -> None:
    with pytest.raises(DidbqError, match=problem):
        BinaryConv2d.from_conv(conv)


def test_string_paddings_become_integers() -> None:
    same = BinaryConv2d.from_conv(nn.Conv2d(4, 4, 5, padding="same", dilation=2), shortcut=True)
    assert same.padding == (4, 4) and same.shortcut
    assert BinaryConv2d.from_conv(nn.Conv2d(4, 4, 3, padding="valid")).padding == (0, 0)


def test_norms_and_act_work_over_channels() -> None:
    act = ChannelRPReLU(6)
    layer = BinaryConv2d(6, 6, 3, padding=1, norm="layernorm", act=act, shortcut=True)
    assert isinstance(layer.norm, LayerNorm2d) and isinstance(BinaryConv2d(2, 2, 1, norm="batchnorm").norm,
                                                                  nn.BatchNorm2d)
    with torch.no_grad():
        for parameter in act.parameters():
            parameter.copy_(torch.randn(6) * 0.2)
    x = torch.randn(2, 6, 4, 5)
    plain = RPReLU(6)
    plain.load_state_dict(act.state_dict())
    assert torch.equal(act(x), plain(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    inputs, signs, scale = _by_hand(layer, x)
    product = _conv_with(layer, inputs, signs * scale.view(-1, 1, 1, 1), layer.bias.detach())
    normed = F.layer_norm(product.permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2)
    assert torch.allclose(layer(x).detach(), act(normed + x).detach(), atol=1e-5)


@pytest.mark.parametrize("channels, out, kernel, stride, padding, dilation, on, note", [
    (8, 8, 3, 1, 1, 1, True, ""),
    (8, 8, 1, 1, 0, 1, True, ""),
    (8, 8, 3, 1, 2, 2, True, ""),
    (8, 16, 1, 1, 0, 1, False, "channels 8 -> 16"),
    (8, 8, 3, 2, 1, 1, False, "stride (2, 2)"),
    (8, 8, 3, 1, 0, 1, False, "(a size-changing padding)"),
])
def test_the_shortcut_needs_the_shape_of_its_input(channels: int, out: int, kernel: int, stride: int, padding: int,
                                                   dilation: int, on: bool, note: str) -> None:
    layer = BinaryConv2d(channels, out, kernel, stride, padding, dilation, shortcut=True)
    assert layer.shortcut is on and (note in layer.shortcut_note if note else layer.shortcut_note == "")
    assert BinaryConv2d(channels, out, kernel, stride, padding, dilation).shortcut_note == ""  # not asked for
    x = torch.randn(2, channels, 7, 7)
    y = layer(x)
    if on:
        set_binarization(layer, weights=False, activations=False)
        assert y.shape == x.shape and torch.allclose(layer(x), _conv_with(layer, x, layer.weight, layer.bias) + x)


def test_a_fixed_binary_weight_gives_the_same_output_to_the_bit() -> None:
    layer = _shifted(BinaryConv2d.from_conv(_conv(GEOMETRIES[2]))).eval()
    x = torch.randn(2, 8, 9, 9)
    signs, scale = layer.binary_weight()
    fixed = _shifted(BinaryConv2d.from_conv(_conv(GEOMETRIES[2]))).eval()
    fixed.load_state_dict(layer.state_dict())
    fixed.fix_binary_weight(signs.detach().flatten(1), scale.detach())  # rows, as the packed file holds them
    assert fixed.weight_is_binary and fixed.weight.shape == layer.weight.shape
    assert torch.equal(fixed(x), layer(x)) and "weights=binary (fixed)" in repr(fixed)


def test_extra_repr_reports_geometry_and_modes() -> None:
    layer = BinaryConv2d(8, 16, 3, stride=2, padding=1, groups=2)
    text = repr(layer)
    assert "kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2" in text
    assert "weights=binary" in text and "inputs=binary" in text and "dilation" not in text
    set_binarization(layer, weights=False, activations=False)
    assert "weights=fp" in repr(layer) and "inputs=fp" in repr(layer)
