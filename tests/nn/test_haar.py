"""The token grid, the undecimated Haar split and DIBA's local term (method.md sections 2 and 3)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from didbq.nn import TokenLayout, haar_bands, local_difference, split_tokens_into_bands
from didbq.nn.haar import from_grid, to_grid

FAST = settings(max_examples=25, deadline=None)

grid_sizes = st.tuples(st.integers(1, 7), st.integers(1, 7))


# ---------------------------------------------------------------- TokenLayout


def test_grid_for_infers_square_grids() -> None:
    layout = TokenLayout(num_prefix=1)
    assert layout.grid_for(197) == (14, 14)
    assert layout.grid_for(17) == (4, 4)
    assert layout.grid_for(2) == (1, 1)
    assert TokenLayout().grid_for(49) == (7, 7)


def test_grid_for_none_cases() -> None:
    assert TokenLayout(num_prefix=1).grid_for(13) is None  # 12 cells: not square
    assert TokenLayout().grid_for(6) is None
    assert TokenLayout(num_prefix=1).grid_for(1) is None  # only the prefix
    assert TokenLayout(num_prefix=2).grid_for(1) is None
    assert TokenLayout(spatial=False).grid_for(16) is None
    assert TokenLayout(num_prefix=1, grid=(2, 3), spatial=False).grid_for(7) is None


def test_grid_for_respects_explicit_grid() -> None:
    layout = TokenLayout(num_prefix=1, grid=(2, 3))
    assert layout.grid_for(7) == (2, 3)
    assert TokenLayout(grid=(4, 1)).grid_for(4) == (4, 1)  # not the inferred (2, 2)
    # explicit grid that does not match the count: fall back to inference
    assert layout.grid_for(10) == (3, 3)
    assert layout.grid_for(9) is None


@FAST
@given(prefix=st.integers(0, 3), size=grid_sizes, channels=st.integers(1, 3))
def test_to_grid_from_grid_round_trip(prefix: int, size: tuple[int, int], channels: int) -> None:
    h, w = size
    x = torch.randn(2, 3, prefix + h * w, channels)
    pre, image = to_grid(x, prefix, (h, w))
    assert pre.shape == (2, 3, prefix, channels)
    assert image.shape == (6, channels, h, w)
    # row-major: token prefix + r*w + c is image cell (r, c)
    assert torch.equal(image[4, :, h - 1, w - 1], x[1, 1, prefix + h * w - 1])
    assert torch.equal(image[0, :, 0, w - 1], x[0, 0, prefix + w - 1])
    assert torch.equal(from_grid(pre, image), x)


# ---------------------------------------------------------------- haar_bands


@FAST
@given(size=grid_sizes, batch=st.integers(1, 2), channels=st.integers(1, 3), bands=st.sampled_from(["one", "three"]))
def test_haar_bands_sum_to_input(size: tuple[int, int], batch: int, channels: int, bands: str) -> None:
    image = torch.randn(batch, channels, *size)
    result = haar_bands(image, bands)
    assert len(result) == (2 if bands == "one" else 4)
    for band in result:
        assert band.shape == image.shape
    assert torch.allclose(sum(result), image, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (3, 4), (5, 5)])
@pytest.mark.parametrize("bands", ["one", "three"])
def test_haar_of_constant_image(size: tuple[int, int], bands: str) -> None:
    image = torch.full((1, 2, *size), 3.25)
    result = haar_bands(image, bands)
    assert torch.allclose(result[0], image, atol=1e-6)
    for detail in result[1:]:
        assert torch.allclose(detail, torch.zeros_like(image), atol=1e-6)


def test_haar_low_band_is_2x2_average_with_replicated_edges() -> None:
    image = torch.arange(12.0).reshape(1, 1, 3, 4)
    low, high = haar_bands(image, "one")
    x = image[0, 0]
    assert low[0, 0, 0, 0] == (x[0, 0] + x[0, 1] + x[1, 0] + x[1, 1]) / 4
    assert low[0, 0, 1, 3] == (2 * x[1, 3] + 2 * x[2, 3]) / 4  # right edge replicated
    assert low[0, 0, 2, 1] == (2 * x[2, 1] + 2 * x[2, 2]) / 4  # bottom edge replicated
    assert low[0, 0, 2, 3] == x[2, 3]  # corner
    assert torch.equal(high, image - low)


def test_haar_three_bands_detail_directions() -> None:
    # columns vary only: the vertical detail (rows) is 0, the horizontal detail is not
    cols = torch.tensor([0.0, 1.0, 4.0, 9.0]).expand(1, 1, 3, 4)
    low, horizontal, vertical, diagonal = haar_bands(cols, "three")
    assert torch.allclose(vertical, torch.zeros_like(cols))
    assert torch.allclose(diagonal, torch.zeros_like(cols), atol=1e-6)
    assert (horizontal.abs() > 0).any()
    rows = cols.transpose(-1, -2).contiguous()
    low, horizontal, vertical, diagonal = haar_bands(rows, "three")
    assert torch.allclose(horizontal, torch.zeros_like(rows))
    assert (vertical.abs() > 0).any()


# ---------------------------------------------------------------- split_tokens_into_bands


@FAST
@given(size=grid_sizes, prefix=st.integers(0, 2), bands=st.sampled_from(["one", "three"]),
       mode=st.sampled_from(["global", "zero"]), lead=st.lists(st.integers(1, 2), min_size=1, max_size=2))
def test_token_bands_sum_to_tokens(size: tuple[int, int], prefix: int, bands: str, mode: str,
                                   lead: list[int]) -> None:
    layout = TokenLayout(num_prefix=prefix, grid=size)
    n = prefix + size[0] * size[1]
    x = torch.randn(*lead, n, 3)
    result = split_tokens_into_bands(x, layout, bands, mode)
    assert result is not None
    assert len(result) == (2 if bands == "one" else 4)
    for band in result:
        assert band.shape == x.shape
    assert torch.allclose(sum(result), x, atol=1e-6)
    # the grid part is exactly haar_bands of the grid
    _, image = to_grid(x, prefix, size)
    for band, image_band in zip(result, haar_bands(image, bands)):
        assert torch.allclose(to_grid(band, prefix, size)[1], image_band)


@pytest.mark.parametrize("bands", ["one", "three"])
def test_token_bands_prefix_zero_mode(bands: str) -> None:
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    x = torch.randn(2, 10, 4)
    result = split_tokens_into_bands(x, layout, bands, "zero")
    assert torch.equal(result[0][:, :1], x[:, :1])
    for detail in result[1:]:
        assert torch.equal(detail[:, :1], torch.zeros(2, 1, 4))


@pytest.mark.parametrize("bands", ["one", "three"])
def test_token_bands_prefix_global_mode(bands: str) -> None:
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    x = torch.randn(2, 10, 4)
    result = split_tokens_into_bands(x, layout, bands, "global")
    grid_mean = x[:, 1:].mean(dim=1, keepdim=True)
    assert torch.allclose(result[0][:, :1], grid_mean)
    assert torch.allclose(result[-1][:, :1], x[:, :1] - grid_mean)
    for middle in result[1:-1]:
        assert torch.equal(middle[:, :1], torch.zeros(2, 1, 4))


def test_token_bands_none_without_grid() -> None:
    assert split_tokens_into_bands(torch.randn(1, 13, 2), TokenLayout(num_prefix=1)) is None
    assert split_tokens_into_bands(torch.randn(1, 16, 2), TokenLayout(spatial=False)) is None


# ---------------------------------------------------------------- local_difference


@pytest.mark.parametrize("mode", ["global", "zero"])
@pytest.mark.parametrize("form", ["laplacian", "neighbour_mean"])
def test_local_difference_of_constant_is_zero(mode: str, form: str) -> None:
    layout = TokenLayout(num_prefix=1, grid=(3, 4))
    v = torch.full((2, 13, 3), -1.7)
    assert torch.allclose(local_difference(v, layout, form, mode), torch.zeros_like(v), atol=1e-5)


@FAST
@given(size=grid_sizes, prefix=st.integers(0, 2), mode=st.sampled_from(["global", "zero"]))
def test_laplacian_is_8_times_neighbour_mean(size: tuple[int, int], prefix: int, mode: str) -> None:
    layout = TokenLayout(num_prefix=prefix, grid=size)
    v = torch.randn(2, prefix + size[0] * size[1], 3)
    lap = local_difference(v, layout, "laplacian", mode)
    mean_form = local_difference(v, layout, "neighbour_mean", mode)
    assert lap.shape == v.shape
    assert torch.allclose(lap, 8 * mean_form, atol=1e-5)


def _laplacian_by_hand(image: torch.Tensor) -> torch.Tensor:
    """sum over the 8 neighbours (edge replicated) of (v_i - v_j), for a single [H, W] grid."""
    h, w = image.shape
    out = torch.zeros_like(image)
    for r in range(h):
        for c in range(w):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if dr == dc == 0:
                        continue
                    rr, cc = min(max(r + dr, 0), h - 1), min(max(c + dc, 0), w - 1)
                    out[r, c] += image[r, c] - image[rr, cc]
    return out


@pytest.mark.parametrize("size", [(3, 3), (2, 5), (1, 4)])
def test_local_difference_laplacian_by_hand(size: tuple[int, int]) -> None:
    h, w = size
    layout = TokenLayout(num_prefix=1, grid=size)
    v = torch.randn(1, 1 + h * w, 1, dtype=torch.float64)
    result = local_difference(v, layout, "laplacian", "global")
    expected = _laplacian_by_hand(v[0, 1:, 0].reshape(h, w)).flatten()
    assert torch.allclose(result[0, 1:, 0], expected, atol=1e-9)
    # prefix with "global": its neighbourhood is the whole grid
    assert torch.allclose(result[0, 0, 0], 8 * (v[0, 0, 0] - v[0, 1:, 0].mean()))
    zero = local_difference(v, layout, "laplacian", "zero")
    assert zero[0, 0, 0] == 0
    assert torch.allclose(zero[0, 1:, 0], expected, atol=1e-9)


def test_local_difference_without_grid_is_zero() -> None:
    v = torch.randn(2, 13, 3)
    assert torch.equal(local_difference(v, TokenLayout(num_prefix=1)), torch.zeros_like(v))
    assert torch.equal(local_difference(v, TokenLayout(spatial=False)), torch.zeros_like(v))


def test_local_difference_five_dims() -> None:
    layout = TokenLayout(grid=(2, 2))
    v = torch.randn(2, 3, 4, 4, 5)  # batch, windows, heads, tokens, dim
    result = local_difference(v, layout)
    assert result.shape == v.shape
    single = local_difference(v[1, 2], layout)
    assert torch.allclose(result[1, 2], single, atol=1e-6)
