"""Sign bits packed along the input dimension: 8 per byte (uint8) or 32 per word (int32).

The layout (docs/format.md):
- sign convention: bit 1 is +1 (the centred weight was >= 0, as `hard_sign` decides), bit 0 is -1;
- bit order: little-endian inside each byte or word: element `j` of a row is bit `j % B` (value `1 << (j % B)`)
  of byte/word `j // B` of that row, `B` = 8 or 32; a 32-bit word is the little-endian int32 made of the row's
  bytes 4w..4w+3, so both layouts hold the same bits in the same place;
- every row is padded separately to whole bytes (words) with 0 bits, which a reader ignores (it knows the number
  of columns from `weight_shape`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from didbq.errors import DidbqError

WORD_BITS = (8, 32)
_DTYPES = {8: torch.uint8, 32: torch.int32}


def packed_columns(columns: int, word_bits: int = 8) -> int:
    """Bytes (words) per packed row of `columns` signs."""
    return math.ceil(columns / word_bits)


def pack_signs(positive: torch.Tensor, word_bits: int = 8) -> torch.Tensor:
    """[rows, columns] booleans (True: +1, False: -1) -> [rows, ceil(columns / word_bits)] uint8 or int32."""
    if word_bits not in WORD_BITS:
        raise DidbqError(f"cannot pack {word_bits} signs per word; use 8 (uint8) or 32 (int32)")
    if positive.dim() != 2 or positive.dtype != torch.bool:
        raise ValueError(f"pack_signs takes a 2-D bool tensor, got {positive.dtype} {tuple(positive.shape)}")
    rows, columns = positive.shape
    packed = np.packbits(positive.detach().cpu().numpy(), axis=1, bitorder="little")
    if word_bits == 32:
        padded = np.zeros((rows, 4 * packed_columns(columns, 32)), dtype=np.uint8)
        padded[:, : packed.shape[1]] = packed
        packed = padded.view("<i4").astype(np.int32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(packed))


def unpack_signs(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The inverse of pack_signs: [rows, words] uint8 or int32 -> [rows, columns] booleans (True: +1)."""
    if packed.dtype not in (torch.uint8, torch.int32) or packed.dim() != 2:
        raise DidbqError(f"packed signs must be a 2-D uint8 or int32 tensor, not {packed.dtype} "
                         f"{tuple(packed.shape)}")
    word_bits = 8 if packed.dtype == torch.uint8 else 32
    if packed.shape[1] != packed_columns(columns, word_bits):
        raise DidbqError(f"packed signs have {packed.shape[1]} words per row, {columns} columns need "
                         f"{packed_columns(columns, word_bits)}")
    array = packed.detach().cpu().numpy()
    if word_bits == 32:
        array = array.astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(array, axis=1, count=columns, bitorder="little")
    return torch.from_numpy(bits.astype(bool, copy=False))


def signs_as_values(positive: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Booleans -> +1 / -1 of `dtype` (exactly the values hard_sign gives)."""
    return torch.where(positive, 1.0, -1.0).to(dtype)
