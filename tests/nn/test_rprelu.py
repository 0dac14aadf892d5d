"""RPReLU and the token-wise RPReLU (method.md section 4)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.nn import RPReLU, TokenRPReLU

FAST = settings(max_examples=25, deadline=None)


def _by_hand(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    shifted = x - g
    return torch.where(shifted >= 0, shifted, b * shifted) + z


def _randomise(module: RPReLU) -> None:
    channels = module.slope.shape[0]
    with torch.no_grad():
        module.shift_in.copy_(torch.randn(channels) * 0.5)
        module.slope.copy_(torch.rand(channels))
        module.shift_out.copy_(torch.randn(channels) * 0.5)


def test_rprelu_initial_parameters() -> None:
    module = RPReLU(3, slope_init=0.1)
    assert torch.equal(module.shift_in.detach(), torch.zeros(3))
    assert torch.allclose(module.slope.detach(), torch.full((3,), 0.1))
    assert torch.equal(module.shift_out.detach(), torch.zeros(3))
    x = torch.randn(4, 3)
    assert torch.allclose(module(x), torch.nn.functional.leaky_relu(x, 0.1))


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), channels=st.integers(1, 6))
def test_rprelu_equals_formula(shape: list[int], channels: int) -> None:
    module = RPReLU(channels)
    _randomise(module)
    x = torch.randn(*shape, channels)
    expected = _by_hand(x, module.shift_in.detach(), module.slope.detach(), module.shift_out.detach())
    assert torch.allclose(module(x).detach(), expected, atol=1e-6)
    # and PReLU(x - g) + z with torch's own PReLU on channels-first layout
    prelu = torch.nn.functional.prelu(
        (x - module.shift_in.detach()).reshape(-1, channels), module.slope.detach()
    ).reshape(x.shape) + module.shift_out.detach()
    assert torch.allclose(module(x).detach(), prelu, atol=1e-6)


def test_rprelu_gradients() -> None:
    module = RPReLU(4)
    _randomise(module)
    x = torch.randn(8, 4)
    module(x).sum().backward()
    shifted = x - module.shift_in.detach()
    negative = shifted < 0
    slope = module.slope.detach()
    assert torch.allclose(module.shift_out.grad, torch.full((4,), 8.0))
    assert torch.allclose(module.slope.grad, (shifted * negative).sum(0))
    assert torch.allclose(module.shift_in.grad, -torch.where(negative, slope, torch.ones(4)).sum(0))


def test_token_rprelu_starts_as_rprelu() -> None:
    token = TokenRPReLU(5, token_shape=(7,))
    plain = RPReLU(5)
    _randomise(plain)
    token.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(token.token_shift_in.detach(), torch.zeros(7, 1))
    assert torch.equal(token.token_shift_out.detach(), torch.zeros(7, 1))
    assert token.token_slope is None
    x = torch.randn(2, 7, 5)
    assert torch.equal(token(x), plain(x))


def test_token_rprelu_token_formula_and_gradients() -> None:
    token = TokenRPReLU(3, token_shape=(4,))
    _randomise(token)
    with torch.no_grad():
        token.token_shift_in.copy_(torch.randn(4, 1) * 0.5)
        token.token_shift_out.copy_(torch.randn(4, 1) * 0.5)
    x = torch.randn(2, 4, 3)
    g = token.shift_in.detach() + token.token_shift_in.detach()  # [4, 3]
    z = token.shift_out.detach() + token.token_shift_out.detach()
    expected = _by_hand(x, g, token.slope.detach(), z)
    y = token(x)
    assert torch.allclose(y.detach(), expected, atol=1e-6)
    (y * torch.randn_like(y)).sum().backward()
    for name, param in token.named_parameters():
        assert param.grad is not None and (param.grad != 0).any(), name
    assert token.token_shift_in.grad.shape == (4, 1)


def test_token_rprelu_token_params_get_gradients_from_zero_init() -> None:
    token = TokenRPReLU(3, token_shape=(4,))
    token(torch.randn(2, 4, 3)).sum().backward()
    assert token.token_shift_in.grad is not None and (token.token_shift_in.grad != 0).all()
    assert torch.allclose(token.token_shift_out.grad, torch.full((4, 1), 6.0))


@pytest.mark.parametrize("token_shape, input_tokens", [((9,), (16,)), ((9,), (4,)), ((3, 3), (5, 4)),
                                                       ((2, 2, 2), (3, 3, 3))])
def test_token_rprelu_resizes_to_other_token_count(token_shape: tuple[int, ...],
                                                   input_tokens: tuple[int, ...]) -> None:
    token = TokenRPReLU(3, token_shape=token_shape, token_slope=True)
    x = torch.randn(2, *input_tokens, 3)
    y = token(x)
    assert y.shape == x.shape
    assert token.token_shift_in.shape == (*token_shape, 1)  # the stored parameter is not changed
    # zero token params resize to zeros (and unit slope to unit slope): still plain RPReLU
    assert torch.allclose(y, torch.nn.functional.leaky_relu(x, 0.25), atol=1e-6)
    # a constant token parameter resizes to the same constant
    with torch.no_grad():
        token.token_shift_out.fill_(0.7)
    assert torch.allclose(token(x), torch.nn.functional.leaky_relu(x, 0.25) + 0.7, atol=1e-6)
    y = token(x)
    (y * torch.randn_like(y)).sum().backward()
    assert token.token_shift_in.grad is not None and (token.token_shift_in.grad != 0).any()


def test_token_rprelu_resize_interpolates_like_position_embedding() -> None:
    token = TokenRPReLU(1, token_shape=(2,))
    with torch.no_grad():
        token.token_shift_out.copy_(torch.tensor([[0.0], [1.0]]))
        token.slope.fill_(1.0)  # identity PReLU: output = x + z'
    x = torch.zeros(1, 4, 1)
    y = token(x).detach().flatten()
    expected = torch.nn.functional.interpolate(torch.tensor([[[0.0, 1.0]]]), size=4, mode="linear",
                                               align_corners=False).flatten()
    assert torch.allclose(y, expected)
    assert y[0] < y[-1] and torch.all(y[1:] >= y[:-1])


def test_token_slope_option() -> None:
    token = TokenRPReLU(2, token_shape=(3,), token_slope=True)
    assert token.token_slope is not None and torch.equal(token.token_slope.detach(), torch.ones(3, 1))
    with torch.no_grad():
        token.token_slope.copy_(torch.tensor([[0.0], [1.0], [4.0]]))
        token.slope.copy_(torch.tensor([0.5, 0.25]))
    x = -torch.ones(1, 3, 2)
    y = token(x).detach()
    # negative inputs are scaled by slope_c * token_slope_n
    expected = -torch.tensor([[0.0, 0.0], [0.5, 0.25], [2.0, 1.0]]).unsqueeze(0)
    assert torch.allclose(y, expected)
    assert torch.equal(token(torch.ones(1, 3, 2)), torch.ones(1, 3, 2))  # positive side untouched
    token(torch.randn(2, 3, 2)).sum().backward()
    assert token.token_slope.grad is not None and (token.token_slope.grad != 0).any()
    assert "token_slope" in token.state_dict()
    assert "token_slope" not in TokenRPReLU(2, token_shape=(3,)).state_dict()


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), channels=st.integers(1, 6))
def test_rprelu_gradients_equal_autograd_of_formula(shape: list[int], channels: int) -> None:
    """The hand-written PReLU backward against autograd through the torch.where formula."""
    module = RPReLU(channels)
    _randomise(module)
    with torch.no_grad():
        module.slope.sub_(0.5)  # negative slopes too
    x = torch.randn(*shape, channels, requires_grad=True)
    upstream = torch.randn(*shape, channels)
    params = [x, module.shift_in, module.slope, module.shift_out]
    got = torch.autograd.grad((module(x) * upstream).sum(), params)
    expected = torch.autograd.grad((_by_hand(x, module.shift_in, module.slope, module.shift_out) * upstream).sum(),
                                   params)
    for name, a, b in zip(["x", "shift_in", "slope", "shift_out"], got, expected):
        assert torch.allclose(a, b, atol=1e-5), name
