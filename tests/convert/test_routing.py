"""A converted model is an ordinary nn.Module: it deep-copies, pickles, saves and reloads its state."""
from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F

import didbq
from didbq.convert.routing import ProductEvent, SDPARoute, explicit_attention, original_class, route, unroute
from didbq.nn import ATTENTION_VARIANTS, BinaryAttention, TokenLayout


def _converted() -> torch.nn.Module:
    return didbq.binarize_model(didbq.build_model("test_vit"), "didb").eval()


def test_deepcopy_and_pickle_keep_the_routed_classes_and_outputs() -> None:
    model = _converted()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone.blocks[0].attn) is type(model.blocks[0].attn)
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_state_dict_round_trip_into_a_fresh_conversion() -> None:
    model = _converted()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = _converted()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_sdpa_route_only_redirects_inside_the_mode() -> None:
    q = torch.randn(1, 2, 5, 4)
    core = BinaryAttention(ATTENTION_VARIANTS["plain"], 2, 4, TokenLayout(), 5, 5)
    with SDPARoute(core):
        routed = F.scaled_dot_product_attention(q, q, q)
    assert core.last_call is not None
    plain = F.scaled_dot_product_attention(q, q, q)
    assert not torch.allclose(routed, plain)


def test_unroute_restores_the_timm_class() -> None:
    model = didbq.build_model("test_vit")
    attention = model.blocks[0].attn
    timm_class = type(attention)
    route(attention, BinaryAttention(ATTENTION_VARIANTS["softmax"], 1, 1, TokenLayout(), 1, 1), None)
    assert type(attention) is not timm_class and original_class(attention) is timm_class
    unroute(attention)
    assert type(attention) is timm_class and not hasattr(attention, "binary_core")


SCORES = ProductEvent("product", ((1, 2, 5, 4), (1, 2, 4, 5), (1, 2, 5, 5)))
SOFTMAX = ProductEvent("softmax", ((1, 2, 5, 5),))
PROBS_V = ProductEvent("product", ((1, 2, 5, 5), (1, 2, 5, 4), (1, 2, 5, 4)))
V_PROBS_T = ProductEvent("product", ((1, 2, 4, 5), (1, 2, 5, 5), (1, 2, 4, 5)))


def test_the_explicit_route_recognises_softmax_attention_by_hand_only() -> None:
    assert explicit_attention([SCORES, SOFTMAX, PROBS_V])
    assert explicit_attention([SCORES, SOFTMAX, V_PROBS_T] * 2)  # levit_conv's layout, twice
    assert explicit_attention([SCORES, SOFTMAX, SOFTMAX, PROBS_V])  # convit: a gated position softmax as well
    assert not explicit_attention([])
    assert not explicit_attention([SOFTMAX, SCORES, PROBS_V])  # coat: softmax(k) first
    assert not explicit_attention([SCORES, PROBS_V])  # linear attention: no softmax
    assert not explicit_attention([SCORES, ProductEvent("softmax", ((1, 2, 5, 5),), last_dim=False), PROBS_V])
    assert not explicit_attention([SCORES, SOFTMAX, ProductEvent("product", ((1, 2, 4, 4), (1, 2, 4, 4),
                                                                            (1, 2, 4, 4)))])


def test_the_explicit_route_sends_both_products_through_the_core() -> None:
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    core = BinaryAttention(ATTENTION_VARIANTS["plain"], 2, 4, TokenLayout(), 5, 5)
    with SDPARoute(core, explicit=True):
        routed = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        transposed = v.transpose(-2, -1) @ (q @ k.transpose(-2, -1) * 0.5).softmax(-1).transpose(-2, -1)
    expected = core(q, k, v, scale=0.5)
    torch.testing.assert_close(routed, expected, rtol=0, atol=0)
    torch.testing.assert_close(transposed, expected.transpose(-2, -1), rtol=0, atol=0)
