"""The C kernels against naive integer references: every code path this CPU runs, awkward shapes (K not a
multiple of 64, N not a multiple of the tile, one row), nonzero padding bits in a file, and the fused attention
against the float BinaryAttention core to the last bit."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.export.packing import pack_signs
from didbq.nn.attention import ATTENTION_VARIANTS, BinaryAttention
from didbq.nn.haar import TokenLayout
from didbq.runtime import kernels
from didbq.runtime.build import ISAS
from didbq.runtime.modules import PackedBinaryAttention
from didbq.runtime.ops import _binary_attention, binary_linear, pack_rows, weight_panels

SETTINGS = settings(max_examples=40, deadline=None)
PATHS = ISAS[: ISAS.index(kernels().best) + 1]  # every path this CPU can run


def naive_binary_linear(x: torch.Tensor, shift: torch.Tensor | None, positive: torch.Tensor, alpha: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Integer dot products of the signs, then the float epilogue (multiply, then add)."""
    inputs = torch.where((x if shift is None else x + shift) >= 0, 1, -1).long()
    weights = torch.where(positive, 1, -1).long()
    y = (inputs @ weights.T).float() * alpha
    return y if bias is None else y + bias


@pytest.mark.parametrize("isa", PATHS)
@SETTINGS
@given(rows=st.integers(1, 9), columns=st.integers(1, 200), outputs=st.integers(1, 110), shifted=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_binary_linear_equals_the_integer_reference(isa: str, rows: int, columns: int, outputs: int,
                                                    shifted: bool, with_bias: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator)
    shift = torch.randn(columns, generator=generator) * 0.3 if shifted else None
    positive = torch.rand(outputs, columns, generator=generator) > 0.5
    alpha = torch.rand(outputs, generator=generator) + 0.01
    bias = torch.randn(outputs, generator=generator) if with_bias else None
    panels = weight_panels(pack_signs(positive), columns)
    y = binary_linear(x, shift, panels, alpha, bias, outputs, isa)
    assert torch.equal(y, naive_binary_linear(x, shift, positive, alpha, bias))


@pytest.mark.parametrize("isa", PATHS)
def test_zero_and_negative_zero_are_plus_one(isa: str) -> None:
    x = torch.tensor([[0.0, -0.0, -1e-30, 1e-30] * 20])
    bits = pack_rows(x, isa=isa)
    expected = sum(1 << j for j in range(64) if j % 4 in (0, 1, 3))
    assert bits[0, 0].item() == expected - (1 << 64 if expected >= 1 << 63 else 0)


def test_padding_bits_of_a_file_do_not_count() -> None:
    positive = torch.rand(5, 70) > 0.5
    packed = pack_signs(positive)
    dirty = packed.clone()
    dirty[:, -1] |= 0b11000000  # bits 70 and 71: padding
    x, alpha = torch.randn(3, 70), torch.ones(5)
    assert torch.equal(binary_linear(x, None, weight_panels(dirty, 70), alpha, None, 5),
                       binary_linear(x, None, weight_panels(packed, 70), alpha, None, 5))


def test_words_of_32_bits_give_the_same_panels() -> None:
    positive = torch.rand(50, 100) > 0.5
    assert torch.equal(weight_panels(pack_signs(positive, 8), 100), weight_panels(pack_signs(positive, 32), 100))


def test_an_unsupported_forced_path_is_one_line() -> None:
    from didbq.errors import DidbqError

    with pytest.raises(DidbqError, match="unknown kernel"):
        kernels().isa_number("neon")


def _core(variant: str, aggregation: str, heads: int, head_dim: int, tokens: int) -> BinaryAttention:
    options = ATTENTION_VARIANTS[variant].model_copy(update={"aggregation": aggregation, "hfsc": "off",
                                                             "qk_binarizer": "rsign", "v_binarizer": "rsign"})
    side = int((tokens - 1) ** 0.5)
    layout = TokenLayout(num_prefix=tokens - side * side, grid=(side, side))
    core = BinaryAttention(options, heads=heads, head_dim=head_dim, layout=layout, queries=tokens, keys=tokens)
    with torch.no_grad():
        for binarizer in (core.q_binarizers[0], core.k_binarizers[0], core.v_binarizer):
            binarizer.shift.normal_(0, 0.2)
    return core


@SETTINGS
@given(variant=st.sampled_from(["plain", "didb", "bivit"]), aggregation=st.sampled_from(["plain", "diba"]),
       heads=st.integers(1, 3), head_dim=st.sampled_from([1, 4, 16, 64, 70, 128]), tokens=st.integers(2, 80),
       seed=st.integers(0, 2**16))
def test_fused_attention_equals_the_float_core(variant: str, aggregation: str, heads: int, head_dim: int,
                                               tokens: int, seed: int) -> None:
    """With a power-of-two score scale the float path's scores are exact, so the two agree to the last bit."""
    torch.manual_seed(seed)
    core = _core(variant, aggregation, heads, head_dim, tokens)
    q, k, v = torch.randn(3, 2, heads, tokens, head_dim).unbind(0)
    core.train()
    core(q, k, v, scale=0.125)  # data-aware initialisation of a
    core.eval()
    packed = copy.deepcopy(core)
    PackedBinaryAttention.adopt(packed)
    with torch.no_grad():
        assert torch.equal(packed(q, k, v, scale=0.125), core(q, k, v, scale=0.125))
        assert packed.last_call == core.last_call  # the report's operation counts see the same call


def test_keys_tied_in_hamming_distance_stay_tied_under_any_scale() -> None:
    """Every key differs from every query in exactly 8 of 32 signs, in different positions: the kernel sees one
    tie, and so must the float path under a scale that is not a power of two (1/sqrt(32), pvt_v2's stage 0):
    its scores are the exact integer products times the scale, whatever order the product sums in."""
    generator = torch.Generator().manual_seed(0)
    core = _core("didb", "plain", heads=1, head_dim=32, tokens=50)
    with torch.no_grad():
        for binarizer in (core.q_binarizers[0], core.k_binarizers[0], core.v_binarizer):
            binarizer.shift.zero_()
    q = torch.ones(1, 1, 50, 32)
    flips = torch.rand(50, 32, generator=generator).argsort(-1)[:, :8]
    k = torch.ones(1, 1, 50, 32).scatter_(-1, flips.view(1, 1, 50, 8), -1.0)
    v = torch.randn(1, 1, 50, 32, generator=generator)
    scale = 32 ** -0.5
    core.train()
    core(q, k, v, scale=scale)
    core.eval()
    packed = copy.deepcopy(core)
    PackedBinaryAttention.adopt(packed)
    with torch.no_grad():
        scores = core.scores(q, k, scale)
        assert (scores == scores[..., :1]).all()  # one value: (32 - 16) * scale
        assert torch.equal(packed(q, k, v, scale=scale), core(q, k, v, scale=scale))


def test_every_path_of_the_fused_attention_agrees() -> None:
    q, k, v = torch.randn(3, 2, 3, 50, 40).unbind(0)
    scale = torch.tensor([0.01, 0.02, 0.015])
    for kind in ("threshold", "bit", "bivit"):
        results = [_binary_attention(q, k, v, None, None, None, scale, 40 ** -0.5, kind, True, isa)
                   for isa in PATHS]
        for out, ones in results[1:]:
            assert torch.equal(out, results[0][0]) and torch.equal(ones, results[0][1])


def test_masked_or_training_calls_take_the_float_path() -> None:
    core = _core("didb", "plain", 2, 16, 17)
    q, k, v = torch.randn(3, 1, 2, 17, 16).unbind(0)
    core.train()
    core(q, k, v)
    packed = copy.deepcopy(core)
    PackedBinaryAttention.adopt(packed)
    core.eval()
    packed.eval()
    mask = torch.zeros(17, 17)
    mask[:, 5] = float("-inf")
    with torch.no_grad():
        assert torch.equal(packed(q, k, v, attn_mask=mask), core(q, k, v, attn_mask=mask))
    assert not packed._fused(q, mask, False) and packed._fused(q, None, False)
