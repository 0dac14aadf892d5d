"""The packed format (sign bits, scales, everything else at its own width) and `load()` (docs/format.md)."""
from __future__ import annotations

from didbq.export.format import (
    FORMAT,
    FORMAT_VERSION,
    PackedFile,
    PackedFileError,
    packed_tensors,
    read_metadata,
    read_packed,
    write_packed,
)
from didbq.export.loader import MODEL_FILE, load, load_into, rebuild
from didbq.export.packing import pack_signs, unpack_signs

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_FILE", "PackedFile", "PackedFileError", "load", "load_into",
           "pack_signs", "packed_tensors", "read_metadata", "read_packed", "rebuild", "unpack_signs",
           "write_packed"]
