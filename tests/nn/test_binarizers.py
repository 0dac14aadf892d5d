"""Sign functions, the weight binarizer and the activation binarizers (method.md sections 1 and 5)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.errors import DidbqError
from didbq.nn import ACTIVATION_BINARIZERS, binarize_weight, hard_sign, set_binarization
from didbq.nn.binarizers import BiTSigned, Identity, RSign, Sign, sign_with_surrogate

FAST = settings(max_examples=25, deadline=None)


def _values(t: torch.Tensor) -> set[float]:
    return set(t.detach().flatten().tolist())


# ---------------------------------------------------------------- hard_sign / sign_with_surrogate


def test_hard_sign_is_plus_minus_one_and_plus_one_at_zero() -> None:
    x = torch.tensor([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0])
    y = hard_sign(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    assert y.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hard_sign_keeps_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(5, 7).to(dtype)
    y = hard_sign(x)
    assert y.dtype == dtype
    assert _values(y) <= {-1.0, 1.0}
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0).to(dtype))


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), scale=st.floats(1e-3, 1e3))
def test_hard_sign_random_shapes(shape: list[int], scale: float) -> None:
    x = torch.randn(*shape) * scale
    x.view(-1)[0] = 0.0
    y = hard_sign(x)
    assert y.shape == x.shape
    assert _values(y) <= {-1.0, 1.0}
    assert y.view(-1)[0].item() == 1.0
    assert torch.equal(y > 0, x >= 0)


def _ste_grad(x: float) -> float:
    return 1.0 if abs(x) <= 1.0 else 0.0


def _approx_sign_grad(x: float) -> float:
    if -1.0 <= x <= 0.0:
        return 2.0 + 2.0 * x
    if 0.0 < x <= 1.0:
        return 2.0 - 2.0 * x
    return 0.0


POINTS = [-2.0, -1.0001, -1.0, -0.75, -0.5, -0.25, -1e-3, 0.0, 1e-3, 0.25, 0.5, 0.75, 0.9999, 1.0, 1.0001, 3.0]


@pytest.mark.parametrize("surrogate, derivative", [("ste", _ste_grad), ("approx_sign", _approx_sign_grad)])
def test_sign_with_surrogate_forward_and_gradient(surrogate: str, derivative) -> None:
    x = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    y = sign_with_surrogate(x, surrogate)
    assert torch.equal(y.detach(), hard_sign(x.detach()))
    (grad,) = torch.autograd.grad(y.sum(), x)
    expected = torch.tensor([derivative(p) for p in POINTS], dtype=torch.float64)
    assert torch.allclose(grad, expected, atol=1e-9), (grad, expected)


@pytest.mark.parametrize("surrogate", ["ste", "approx_sign"])
def test_sign_with_surrogate_gradient_is_chained(surrogate: str) -> None:
    # The upstream gradient is multiplied by the surrogate derivative (not replaced by it).
    x = torch.tensor([-0.5, 0.25, 0.5, 2.0], requires_grad=True)
    upstream = torch.tensor([3.0, -2.0, 5.0, 7.0])
    (grad,) = torch.autograd.grad((sign_with_surrogate(x, surrogate) * upstream).sum(), x)
    deriv = _ste_grad if surrogate == "ste" else _approx_sign_grad
    expected = upstream * torch.tensor([deriv(v) for v in x.tolist()])
    assert torch.allclose(grad, expected, atol=1e-6)


@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), surrogate=st.sampled_from(["ste", "approx_sign"]))
def test_sign_with_surrogate_output_is_exactly_binary(shape: list[int], surrogate: str) -> None:
    x = torch.randn(*shape) * 2
    y = sign_with_surrogate(x, surrogate)
    assert _values(y) <= {-1.0, 1.0}
    assert torch.equal(y, hard_sign(x))


# ---------------------------------------------------------------- binarize_weight


@FAST
@given(rows=st.integers(1, 6), cols=st.integers(1, 9), offset=st.floats(-3, 3))
def test_binarize_weight_signs_and_scale(rows: int, cols: int, offset: float) -> None:
    weight = torch.randn(rows, cols, dtype=torch.float64) + offset
    signs, scale = binarize_weight(weight)
    assert signs.shape == (rows, cols)
    assert scale.shape == (rows, 1)
    assert _values(signs) <= {-1.0, 1.0}
    centred = weight - weight.mean(dim=1, keepdim=True)
    assert torch.equal(signs, hard_sign(centred))
    assert torch.allclose(scale, weight.abs().mean(dim=1, keepdim=True))
    # the binary weight takes exactly +-scale per row
    binary = signs * scale
    assert torch.allclose(binary.abs(), scale.expand_as(binary))


def test_binarize_weight_centres_each_row() -> None:
    # all-positive row: without centring every sign would be +1
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -10.0]])
    signs, scale = binarize_weight(weight)
    assert signs.tolist() == [[-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0]]
    assert scale.flatten().tolist() == [2.5, 4.0]


def test_binarize_weight_gradient_reaches_latent_weight() -> None:
    weight = torch.randn(4, 6, requires_grad=True)
    signs, scale = binarize_weight(weight)
    upstream = torch.randn(4, 6)
    (grad,) = torch.autograd.grad((signs * scale * upstream).sum(), weight)
    assert grad.shape == weight.shape
    assert torch.isfinite(grad).all()
    assert (grad != 0).any()
    # scale only: d/dW mean|W| = sign(W)/cols
    (grad_scale,) = torch.autograd.grad(binarize_weight(weight)[1].sum(), weight)
    assert torch.allclose(grad_scale, torch.sign(weight.detach()) / 6)
    # signs only: straight through the centring, d/dW sum_j u_j (W_j - mean W) = u - mean(u)
    (grad_signs,) = torch.autograd.grad((binarize_weight(weight)[0] * upstream).sum(), weight)
    assert torch.allclose(grad_signs, upstream - upstream.mean(dim=1, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------- registry and enabled switch


def test_registry_has_the_binarizers() -> None:
    assert ACTIVATION_BINARIZERS["sign"] is Sign
    assert ACTIVATION_BINARIZERS["rsign"] is RSign
    assert ACTIVATION_BINARIZERS["bit_signed"] is BiTSigned
    assert ACTIVATION_BINARIZERS["identity"] is Identity
    with pytest.raises(KeyError):
        ACTIVATION_BINARIZERS["nope"]


@pytest.mark.parametrize("name", ["sign", "rsign", "bit_signed", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_disabled_binarizer_is_identity(name: str, training: bool) -> None:
    module = ACTIVATION_BINARIZERS[name](5)
    module.train(training)
    module.enabled = False
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = module(x)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
    if name == "bit_signed":
        assert not bool(module.initialised)  # a disabled binarizer does not initialise from data


def test_set_binarization_switches_activation_binarizers() -> None:
    model = torch.nn.Sequential(RSign(4), BiTSigned(4), Sign(4))
    set_binarization(model, activations=False)
    assert all(not m.enabled for m in model)
    x = torch.randn(2, 4)
    assert torch.equal(model(x), x)
    set_binarization(model, activations=True)
    assert all(m.enabled for m in model)


def test_output_is_binary_flags() -> None:
    assert Sign(3).output_is_binary
    assert RSign(3).output_is_binary
    assert BiTSigned(3).output_is_binary
    assert not Identity(3).output_is_binary
    x = torch.randn(2, 3)
    assert torch.equal(Identity(3)(x), x)


# ---------------------------------------------------------------- Sign / RSign


@pytest.mark.parametrize("surrogate", ["ste", "approx_sign"])
def test_sign_module_matches_function(surrogate: str) -> None:
    x = torch.randn(2, 3, 4, requires_grad=True)
    module = Sign(4, surrogate)
    y = module(x)
    assert torch.equal(y, hard_sign(x.detach()))
    (g1,) = torch.autograd.grad(y.sum(), x)
    (g2,) = torch.autograd.grad(sign_with_surrogate(x, surrogate).sum(), x)
    assert torch.equal(g1, g2)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), channels=st.integers(1, 6))
def test_rsign_output_binary_and_uses_shift(shape: list[int], channels: int) -> None:
    module = RSign(channels)
    assert torch.equal(module.shift.detach(), torch.zeros(channels))
    with torch.no_grad():
        module.shift.copy_(torch.linspace(-0.5, 0.5, channels))
    x = torch.randn(*shape, channels)
    y = module(x)
    assert y.shape == x.shape
    assert _values(y) <= {-1.0, 1.0}
    assert torch.equal(y, hard_sign(x + module.shift.detach()))


def test_rsign_shift_moves_the_threshold_and_gets_gradient() -> None:
    module = RSign(2, surrogate="ste")
    with torch.no_grad():
        module.shift.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[-0.3, 0.3], [-0.6, 0.6]])
    assert module(x).tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    x = torch.randn(8, 2)
    module(x).sum().backward()
    assert module.shift.grad is not None
    # ste: gradient of the shift = number of elements with |x + b| <= 1
    expected = ((x + module.shift.detach()).abs() <= 1).float().sum(0)
    assert torch.allclose(module.shift.grad, expected)
    assert (module.shift.grad != 0).any()


# ---------------------------------------------------------------- threshold_init: mean


@pytest.mark.parametrize("name", ["rsign", "bit_signed"])
def test_threshold_starts_at_minus_the_mean_of_the_first_training_batch(name: str) -> None:
    binarizer = ACTIVATION_BINARIZERS[name](4)
    binarizer.start_threshold_at_mean()
    after_relu = torch.relu(torch.randn(6, 5, 4)) * torch.tensor([0.5, 1.0, 2.0, 4.0])
    binarizer.eval()
    binarizer(after_relu)
    assert not bool(binarizer.threshold_started)  # eval passes do not start it
    assert torch.equal(binarizer.shift.detach(), torch.zeros(4))
    binarizer.train()
    y = binarizer(after_relu)
    assert torch.allclose(binarizer.shift.detach(), -after_relu.mean(dim=(0, 1)))
    assert (y > 0).any() and (y < 0).any()  # a threshold at 0 gives all +1 after a ReLU
    started = binarizer.shift.detach().clone()
    binarizer(after_relu * 100)
    assert torch.equal(binarizer.shift.detach(), started)  # once only
    fresh = ACTIVATION_BINARIZERS[name](4)
    fresh.start_threshold_at_mean()
    fresh.load_state_dict(binarizer.state_dict())  # the flag travels with the weights: a resumed run keeps it
    fresh.train()
    fresh(after_relu * 100)
    assert torch.equal(fresh.shift.detach(), started)


def test_bit_signed_scale_starts_from_the_centred_inputs() -> None:
    binarizer = BiTSigned(3)
    binarizer.start_threshold_at_mean()
    x = torch.rand(8, 3) + 5.0
    binarizer.train()
    binarizer(x)
    assert torch.allclose(binarizer.scale.detach(), (x - x.mean(0)).abs().mean(0).clamp_min(1e-4))


@pytest.mark.parametrize("cls", [Sign, Identity])
def test_threshold_init_needs_a_learnable_threshold(cls: type) -> None:
    with pytest.raises(DidbqError, match="learnable threshold"):
        cls(4).start_threshold_at_mean()


# ---------------------------------------------------------------- BiTSigned


def test_bit_signed_initialises_scale_on_first_training_batch() -> None:
    module = BiTSigned(4)
    module.train()
    assert not bool(module.initialised)
    x = torch.randn(3, 5, 4) * torch.tensor([0.5, 1.0, 2.0, 4.0])
    module(x)
    assert bool(module.initialised)
    assert torch.allclose(module.scale.detach(), x.abs().mean(dim=(0, 1)))
    first = module.scale.detach().clone()
    module(torch.randn(3, 5, 4) * 100)
    assert torch.equal(module.scale.detach(), first)  # not re-initialised


def test_bit_signed_not_initialised_in_eval() -> None:
    module = BiTSigned(4)
    module.eval()
    x = torch.randn(3, 4) * 10
    y = module(x)
    assert not bool(module.initialised)
    assert torch.equal(module.scale.detach(), torch.ones(4))
    assert torch.equal(y, hard_sign(x))


def test_bit_signed_initialised_flag_is_saved_in_state_dict() -> None:
    module = BiTSigned(3)
    module.train()
    module(torch.randn(4, 3) * 3)
    state = module.state_dict()
    assert "initialised" in state and bool(state["initialised"])
    fresh = BiTSigned(3)
    fresh.load_state_dict(state)
    fresh.train()
    fresh(torch.randn(4, 3) * 1000)
    assert torch.equal(fresh.scale.detach(), module.scale.detach())


@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 5), channels=st.integers(1, 6))
def test_bit_signed_outputs_plus_minus_scale_per_channel(batch: int, tokens: int, channels: int) -> None:
    module = BiTSigned(channels)
    with torch.no_grad():
        module.scale.copy_(torch.rand(channels) + 0.1)
        module.shift.copy_(torch.randn(channels) * 0.3)
    module.initialised.fill_(True)
    module.train()
    x = torch.randn(batch, tokens, channels)
    y = module(x)
    scale = module.scale.detach()
    assert torch.equal(y.abs(), scale.expand_as(y))
    assert torch.equal(y, scale * hard_sign(x + module.shift.detach()))


def test_bit_signed_negative_scale_uses_its_magnitude() -> None:
    module = BiTSigned(2)
    module.initialised.fill_(True)
    with torch.no_grad():
        module.scale.copy_(torch.tensor([-2.0, 3.0]))
    y = module(torch.tensor([[1.0, -1.0]]))
    assert y.tolist() == [[2.0, -3.0]]


def test_bit_signed_scale_and_shift_get_gradients() -> None:
    module = BiTSigned(4)
    module.train()
    x = torch.randn(6, 4, requires_grad=True)
    y = module(x)
    (y * torch.randn_like(y)).sum().backward()
    for name in ("scale", "shift"):
        grad = getattr(module, name).grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all(), name
    assert x.grad is not None and (x.grad != 0).any()


def test_bit_signed_lsq_gradients_by_hand() -> None:
    # y = a*sign(r), r = clip((x+b)/a); dy/da = sign(r) - r inside the clip, sign(r) outside; dy/db = 1 inside.
    module = BiTSigned(1)
    module.initialised.fill_(True)
    with torch.no_grad():
        module.scale.fill_(2.0)
        module.shift.fill_(0.5)
    x = torch.tensor([[-1.5], [0.5], [3.0], [-4.0]])
    module(x).sum().backward()
    r = ((x + 0.5) / 2.0).flatten()
    inside = r.abs() <= 1
    expected_scale = torch.where(inside, torch.sign(r) - r, torch.sign(r)).sum()
    assert torch.allclose(module.scale.grad, expected_scale.reshape(1))
    assert torch.allclose(module.shift.grad, inside.float().sum().reshape(1))
