"""Token-grid tools: splitting prefix tokens from the patch grid, the undecimated Haar split, the local term.

Tokens are laid out as [..., N, C] with `num_prefix` class/register/distillation tokens first and a row-major
patch grid after them (timm's convention; a Swin window is a grid with no prefix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenLayout:
    """How the N tokens an attention layer sees map to a 2-D grid.

    `grid=None` infers a square grid from N - num_prefix; `spatial=False` says the tokens are not image cells at
    all (XCiT attends over channels), so there is no grid, no local term and no high band.
    """

    num_prefix: int = 0
    grid: tuple[int, int] | None = None
    spatial: bool = True

    def grid_for(self, num_tokens: int) -> tuple[int, int] | None:
        """The (rows, cols) of the grid part of a sequence of `num_tokens`, or None if there is no grid."""
        cells = num_tokens - self.num_prefix
        if cells <= 0 or not self.spatial:
            return None
        if self.grid is not None and self.grid[0] * self.grid[1] == cells:
            return self.grid
        side = math.isqrt(cells)
        return (side, side) if side * side == cells else None


def to_grid(x: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, C] -> (prefix [..., P, C], grid [B', C, H, W]) with all leading dims folded into B'."""
    prefix, cells = x[..., :num_prefix, :], x[..., num_prefix:, :]
    image = cells.reshape(-1, grid[0], grid[1], cells.shape[-1]).permute(0, 3, 1, 2)
    return prefix, image


def from_grid(prefix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Inverse of to_grid."""
    cells = image.permute(0, 2, 3, 1).reshape(*prefix.shape[:-2], -1, image.shape[1])
    return torch.cat([prefix, cells], dim=-2)


def haar_low(image: torch.Tensor) -> torch.Tensor:
    """The undecimated Haar low band of [B, C, H, W]: the 2x2 average of each cell with its right and lower
    neighbours (edges replicated), same size as the input."""
    return F.avg_pool2d(F.pad(image, (0, 1, 0, 1), mode="replicate"), 2, stride=1)


def haar_bands(image: torch.Tensor, bands: Literal["one", "three"] = "one") -> list[torch.Tensor]:
    """Undecimated (stride 1, same size) Haar split of [B, C, H, W]; the returned bands sum to the input.

    "one": [low, high = x - low]. "three": [low, LH, HL, HH], the horizontal, vertical and diagonal details.
    """
    low = haar_low(image)
    if bands == "one":
        return [low, image - low]
    padded = F.pad(image, (0, 1, 0, 1), mode="replicate")
    a, b = padded[..., :-1, :-1], padded[..., :-1, 1:]
    c, d = padded[..., 1:, :-1], padded[..., 1:, 1:]
    horizontal = (a - b + c - d) / 4
    vertical = (a + b - c - d) / 4
    return [low, horizontal, vertical, image - low - horizontal - vertical]


def _prefix_low(x: torch.Tensor, prefix: torch.Tensor, num_prefix: int,
                prefix_mode: Literal["global", "zero"]) -> torch.Tensor:
    """Prefix tokens have no neighbours: their low band is the grid mean ("global") or themselves ("zero")."""
    if prefix_mode == "global" and prefix.shape[-2] > 0:
        return x[..., num_prefix:, :].mean(dim=-2, keepdim=True).expand_as(prefix)
    return prefix


def split_tokens_into_bands(x: torch.Tensor, layout: TokenLayout, bands: Literal["one", "three"] = "one",
                            prefix_mode: Literal["global", "zero"] = "global") -> list[torch.Tensor] | None:
    """Haar bands of a token sequence [..., N, C]; None when the tokens have no grid.

    Prefix tokens have no neighbours: with prefix_mode "global" their low band is the mean of the grid (so they
    keep a high band, x - mean, and gradients through the class token reach the high-band path); with "zero"
    their low band is x itself and their detail bands are 0.
    """
    grid = layout.grid_for(x.shape[-2])
    if grid is None:
        return None
    prefix, image = to_grid(x, layout.num_prefix, grid)
    band_images = haar_bands(image, bands)
    prefix_low = _prefix_low(x, prefix, layout.num_prefix, prefix_mode)
    zeros = torch.zeros_like(prefix)
    prefix_bands = [prefix_low] + [zeros] * (len(band_images) - 2) + [prefix - prefix_low]
    return [from_grid(p, image_band) for p, image_band in zip(prefix_bands, band_images)]


def low_band_of_tokens(x: torch.Tensor, layout: TokenLayout,
                       prefix_mode: Literal["global", "zero"] = "global") -> torch.Tensor | None:
    """The first band of split_tokens_into_bands alone (HFSC with a separate high projection needs no more)."""
    grid = layout.grid_for(x.shape[-2])
    if grid is None:
        return None
    prefix, image = to_grid(x, layout.num_prefix, grid)
    return from_grid(_prefix_low(x, prefix, layout.num_prefix, prefix_mode), haar_low(image))


def local_difference(v: torch.Tensor, layout: TokenLayout,
                     form: Literal["laplacian", "neighbour_mean"] = "laplacian",
                     prefix_mode: Literal["global", "zero"] = "global") -> torch.Tensor:
    """DIBA's local term on [..., N, C]: sum over the 8 grid neighbours j of (v_i - v_j) (edges replicated).

    "neighbour_mean" divides by 8. Prefix tokens: with "global" their neighbourhood is the whole grid
    (v_p - mean grid, times 8 for the laplacian form); with "zero" they get 0. No grid: all zeros.
    """
    grid = layout.grid_for(v.shape[-2])
    if grid is None:
        return torch.zeros_like(v)
    prefix, image = to_grid(v, layout.num_prefix, grid)
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    neighbour_sum = F.avg_pool2d(padded, 3, stride=1) * 9 - image
    weight = 8.0 if form == "laplacian" else 1.0
    grid_term = (image - neighbour_sum / 8) * weight
    if prefix_mode == "global" and prefix.shape[-2] > 0:
        grid_mean = v[..., layout.num_prefix:, :].mean(dim=-2, keepdim=True)
        prefix_term = (prefix - grid_mean) * weight
    else:
        prefix_term = torch.zeros_like(prefix)
    return from_grid(prefix_term, grid_term)
