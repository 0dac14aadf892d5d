"""Sign packing: exact round trips for any shape, the documented bit order and sign convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.errors import DidbqError
from didbq.export.packing import pack_signs, packed_columns, signs_as_values, unpack_signs
from didbq.nn import binarize_weight, hard_sign

FAST = settings(max_examples=60, deadline=None)


@st.composite
def sign_matrices(draw: st.DrawFn) -> torch.Tensor:
    """Boolean matrices with 1 to 9 rows and 1 to 100 columns (odd, not divisible by 8 or 32, and aligned)."""
    rows = draw(st.integers(1, 9))
    columns = draw(st.one_of(st.integers(1, 100), st.sampled_from([1, 7, 8, 9, 31, 32, 33, 63, 64, 65])))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, columns, generator=generator) < density


@FAST
@given(signs=sign_matrices(), word_bits=st.sampled_from([8, 32]))
def test_round_trip_is_exact_for_any_shape(signs: torch.Tensor, word_bits: int) -> None:
    packed = pack_signs(signs, word_bits)
    rows, columns = signs.shape
    assert packed.dtype == (torch.uint8 if word_bits == 8 else torch.int32)
    assert packed.shape == (rows, packed_columns(columns, word_bits))
    assert torch.equal(unpack_signs(packed, columns), signs)


@FAST
@given(signs=sign_matrices())
def test_padding_bits_are_zero_and_both_layouts_hold_the_same_bits(signs: torch.Tensor) -> None:
    columns = signs.shape[1]
    as_bytes = pack_signs(signs, 8).numpy()
    words = pack_signs(signs, 32).numpy().astype("<i4").view(np.uint8)  # little-endian bytes of each word
    assert np.array_equal(words[:, : as_bytes.shape[1]], as_bytes)
    assert not words[:, as_bytes.shape[1]:].any()
    padding = as_bytes.shape[1] * 8 - columns
    if padding:
        assert not (as_bytes[:, -1] >> (8 - padding)).any()


def test_bit_order_is_little_endian_and_bit_one_is_plus_one() -> None:
    signs = torch.zeros(1, 40, dtype=torch.bool)
    signs[0, 0] = signs[0, 9] = signs[0, 39] = True
    assert pack_signs(signs, 8).tolist() == [[1, 2, 0, 0, 128]]
    assert pack_signs(signs, 32).tolist() == [[1 | (2 << 8), 128]]
    assert signs_as_values(unpack_signs(pack_signs(signs), 40))[0, :10].tolist() == [1, -1, -1, -1, -1, -1, -1,
                                                                                      -1, -1, 1]


def test_the_sign_of_zero_is_plus_one_as_in_forward() -> None:
    weight = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 2.0]])  # centred: all zeros, then -2, 0, 2
    signs, _ = binarize_weight(weight)
    assert torch.equal(signs, hard_sign(weight - weight.mean(1, keepdim=True)))
    restored = signs_as_values(unpack_signs(pack_signs(signs > 0), 3))
    assert restored.tolist() == [[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]


def test_a_large_matrix_round_trips() -> None:
    signs = torch.rand(1536, 384) > 0.5
    for word_bits in (8, 32):
        assert torch.equal(unpack_signs(pack_signs(signs, word_bits), 384), signs)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D bool"):
        pack_signs(torch.ones(3, 4))
    with pytest.raises(DidbqError, match="8 .* or 32"):
        pack_signs(torch.ones(3, 4, dtype=torch.bool), 16)
    with pytest.raises(DidbqError, match="words per row"):
        unpack_signs(torch.zeros(2, 3, dtype=torch.uint8), 40)
    with pytest.raises(DidbqError, match="uint8 or int32"):
        unpack_signs(torch.zeros(2, 3), 20)
