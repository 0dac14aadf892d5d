"""A converted model is an ordinary nn.Module: it deep-copies, pickles, saves and reloads its state."""
from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F

import didbq
from didbq.convert.routing import SDPARoute, original_class, route, unroute
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
