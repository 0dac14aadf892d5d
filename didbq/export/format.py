"""The packed file (docs/format.md): safetensors with sign bits for every binary weight and metadata to rebuild.

A binary layer `L` (a BinaryLinear or BinaryConv2d whose weights are binary) is stored as three tensors, in the
style of compressed-tensors' pack-quantized layout:
- `L.weight_packed`: the signs of the centred latent weight, one row per output channel (a convolution's
  [in / groups, kh, kw] weights flattened in that order), packed along the row (packing.py);
- `L.weight_shape`: int64, the shape of the unpacked weight: [rows, columns] for a linear, [out, in / groups,
  kh, kw] for a convolution (format version 2; version 1 files hold linears only);
- `L.weight_scale`: the per-row scale mean|W|, [rows, 1], at the file's floating-point width;
so that signs * scale is exactly the binary weight the layer used in forward. Every other tensor of the model's
state (latent-free) is stored under its own name at its own dtype, floating-point ones at the file's width
(fp32 by default, fp16 optional). The header metadata (all strings) says how to rebuild the model.

Reading never unpickles anything: the file is checked to be safetensors (8-byte header length, a JSON header,
data of exactly the declared length) before a tensor is read, and a pickle or zip (torch.save) file is refused.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from didbq.errors import DidbqError
from didbq.export.packing import pack_signs, signs_as_values
from didbq.nn.binarizers import ActivationBinarizer
from didbq.nn.binary import BinaryLayer
from didbq.train.checkpoint import atomic_path

FORMAT = "didbq.packed"
FLOAT_FORMAT = "didbq.float"  # `didbq export --format float`: binary weights expanded, for inspection only
FORMAT_VERSION = 2  # 2: binary convolutions (4-D weight_shape); a version 1 file is a version 2 file without them
READABLE_VERSIONS = ("1", "2")
PACKED, SHAPE, SCALE = "weight_packed", "weight_shape", "weight_scale"
SIGN_CONVENTION = "bit 1 = +1 (row-centred weight >= 0), bit 0 = -1; padding bits 0"
BIT_ORDER = "little"
FP_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_PICKLE = b"\x80"  # pickle protocol 2+: 0x80 then the protocol number; checked only if not safetensors
_PROTOCOLS = {bytes([n]) for n in range(2, 6)}
_ZIP_MAGIC = b"PK\x03\x04"
_PLAIN = {"format", "format_version", "didbq_version", "model_name", "fp_dtype", "pack", "bit_order",
          "sign_convention", "tensors_sha256"}  # every other metadata value is JSON
_REQUIRED = ("format", "format_version", "model_name", "model_args", "recipe", "binarization", "tensors_sha256")


class PackedFileError(DidbqError):
    """A file that is not a readable didbq packed file (one line: what is wrong and what to do)."""


@dataclass
class PackedFile:
    """A packed file as read: its tensors, its decoded metadata and where its bytes went."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    file_bytes: int
    header_bytes: int  # the 8-byte length and the JSON header (with its padding)
    payload_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.payload_bytes = self.file_bytes - self.header_bytes

    @property
    def binary_layers(self) -> list[str]:
        return sorted(key[: -len(PACKED) - 1] for key in self.tensors if key.endswith("." + PACKED))

    @property
    def fp_dtype(self) -> torch.dtype:
        return FP_DTYPES[self.metadata["fp_dtype"]]


def binary_parts(layer: BinaryLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs as booleans, True = +1, one row per output channel; per-row scale [rows, 1]) of the binary weight
    `layer` uses in forward."""
    signs, scale = layer.binary_weight()
    return signs.detach().flatten(1) > 0, scale.detach()


def refuse_inference_only(model: nn.Module) -> None:
    """A model on the packed runtime (didbq.runtime) has no latent binary layers left to pack: say what to do
    instead."""
    if any(getattr(module, "inference_only", False) for module in model.modules()):
        raise DidbqError("this model runs on the packed runtime and cannot be written again; load it with "
                         "didbq.load(path, runtime='reference'), or use `didbq export`")


def binary_layers(model: nn.Module) -> dict[str, BinaryLayer]:
    """The BinaryLinear and BinaryConv2d modules whose weights are binary now (the ones the file packs)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLayer) and m.binarize_weights}


def binarization_state(model: nn.Module) -> dict[str, Any]:
    """Which activation binarizers are on: true (all), false (none) or the list of those that are."""
    binarizers = {name: m.enabled for name, m in model.named_modules() if isinstance(m, ActivationBinarizer)}
    enabled = sorted(name for name, on in binarizers.items() if on)
    activations: bool | list[str] = (True if len(enabled) == len(binarizers) else False if not enabled else enabled)
    return {"weights": bool(binary_layers(model)), "activations": activations}


def packed_tensors(model: nn.Module, fp_dtype: torch.dtype = torch.float32, word_bits: int = 8
                   ) -> dict[str, torch.Tensor]:
    """The tensors of the packed file: binary weights as packed signs, shape and scale; the rest of the state
    at its own dtype, floating-point tensors cast to `fp_dtype`."""
    refuse_inference_only(model)
    layers = binary_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix = key[: -len(".weight")]
        if key.endswith(".weight") and prefix in layers:
            positive, scale = binary_parts(layers[prefix])
            tensors[f"{prefix}.{PACKED}"] = pack_signs(positive.cpu(), word_bits)
            tensors[f"{prefix}.{SHAPE}"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
            tensors[f"{prefix}.{SCALE}"] = scale.detach().to("cpu", fp_dtype).contiguous()
            continue
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(fp_dtype)
        tensors[key] = tensor.contiguous().clone()  # clone: shared storage is stored once per name
    return tensors


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in name order: name, dtype, shape and raw little-endian bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False, default=str)


def _dtype(fp_dtype: torch.dtype | str) -> tuple[torch.dtype, str]:
    names = {dtype: name for name, dtype in FP_DTYPES.items()}
    dtype = FP_DTYPES.get(fp_dtype) if isinstance(fp_dtype, str) else fp_dtype
    if dtype not in names:
        raise DidbqError(f"fp_dtype {fp_dtype}: use one of {', '.join(FP_DTYPES)}")
    return dtype, names[dtype]


def _metadata_for(model: nn.Module, tensors: dict[str, torch.Tensor], form: str, model_name: str,
                  model_args: dict[str, Any], recipe: Any, fp_name: str, extra: dict[str, Any] | None
                  ) -> dict[str, str]:
    import didbq

    metadata = {
        "format": form, "format_version": str(FORMAT_VERSION), "didbq_version": didbq.__version__,
        "model_name": model_name, "model_args": _compact(model_args), "recipe": _compact(recipe.effective()),
        "binarization": _compact(binarization_state(model)), "fp_dtype": fp_name,
    }
    if form == FORMAT:
        metadata.update({"bit_order": BIT_ORDER, "sign_convention": SIGN_CONVENTION})
    metadata["tensors_sha256"] = tensors_hash(tensors)
    metadata.update({key: _compact(value) for key, value in (extra or {}).items()})
    return metadata


def write_packed(model: nn.Module, path: Path, *, model_name: str, model_args: dict[str, Any], recipe: Any,
                 fp_dtype: torch.dtype | str = torch.float32, word_bits: int = 8,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (converted by `recipe`, binarized as it should be stored) as a packed file, atomically
    (temporary name, then rename). `recipe` is the effective didbq Recipe, `model_name` and `model_args` what
    timm.create_model needs to rebuild it; `extra` adds JSON metadata (results, metrics, class_names, ...)."""
    dtype, fp_name = _dtype(fp_dtype)
    tensors = packed_tensors(model, dtype, word_bits)
    metadata = _metadata_for(model, tensors, FORMAT, model_name, model_args, recipe, fp_name, extra)
    metadata["pack"] = f"{word_bits} signs per {'uint8' if word_bits == 8 else 'int32'}"
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def write_float(model: nn.Module, path: Path, *, model_name: str, model_args: dict[str, Any], recipe: Any,
                fp_dtype: torch.dtype | str = torch.float32, extra: dict[str, Any] | None = None) -> Path:
    """The unpacked state dict for inspection: each binary weight expanded to signs * scale under `weight`."""
    dtype, fp_name = _dtype(fp_dtype)
    refuse_inference_only(model)
    layers = binary_layers(model)
    tensors = {}
    for key, tensor in model.state_dict().items():
        prefix = key[: -len(".weight")]
        if key.endswith(".weight") and prefix in layers:
            positive, scale = binary_parts(layers[prefix])
            tensor = (signs_as_values(positive, scale.dtype) * scale).reshape(tensor.shape)
        tensor = tensor.detach().to("cpu")
        tensors[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous().clone()
    metadata = _metadata_for(model, tensors, FLOAT_FORMAT, model_name, model_args, recipe, fp_name, extra)
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------- reading

def _refuse(path: Path, problem: str) -> PackedFileError:
    return PackedFileError(f"{path}: {problem}")


def _head(path: Path, data: bytes | None) -> tuple[bytes, int, bytes]:
    """(the first 8 bytes, the file size, the header bytes it declares, or b"" if it cannot hold them)."""
    if data is not None:
        (length,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
        fits = 8 <= 8 + length <= len(data) and length <= MAX_HEADER_BYTES
        return data[:8], len(data), data[8: 8 + length] if fits else b""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        fits = 8 + length <= size and length <= MAX_HEADER_BYTES
        return prefix, size, handle.read(length) if fits else b""


def read_header(path: Path, data: bytes | None = None) -> tuple[dict[str, Any], int]:
    """The safetensors header of `path` (or of its bytes `data`), checked and never unpickled, and its length
    with the 8-byte prefix."""
    path = Path(path)
    if data is None and not path.exists():
        raise _refuse(path, "no such file")
    if data is None and path.is_dir():
        raise _refuse(path, "is a folder; give a packed .safetensors file or a run folder with model.safetensors")
    prefix, size, raw = _head(path, data)
    header = None
    if raw[:1] == b"{":
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    if header is None and (prefix[:4] == _ZIP_MAGIC or (prefix[:1] == _PICKLE and prefix[1:2] in _PROTOCOLS)):
        raise _refuse(path, "is a pickle/torch.save file; didbq never unpickles weights: give a packed "
                            "model.safetensors written by didbq")
    if size < 8:
        raise _refuse(path, f"is {size} bytes, too short for safetensors (truncated or not a weights file)")
    (length,) = struct.unpack("<Q", prefix)
    if not raw:
        raise _refuse(path, "is not a safetensors file, or its header is truncated (header length "
                            f"{length:,} in a {size:,}-byte file)")
    if header is None:
        raise _refuse(path, "is not a safetensors file, or its header is corrupted (not JSON); write the file "
                            "again")
    if not isinstance(header, dict):
        raise _refuse(path, "has a corrupted safetensors header (not a JSON object); write the file again")
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)]
    expected = 8 + length + max((e for e in ends if isinstance(e, int)), default=0)
    if size < expected:
        raise _refuse(path, f"is truncated: {size:,} bytes, the header declares {expected:,}; copy or write "
                            f"the file again")
    return header, 8 + length


def _metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    raw = header.get("__metadata__") or {}
    if raw.get("format") == FLOAT_FORMAT:
        raise _refuse(path, "is an unpacked float export (for inspection); didbq.load reads the packed "
                            "model.safetensors")
    if raw.get("format") != FORMAT:
        raise _refuse(path, "is a safetensors file but not a didbq packed file (no didbq format metadata); "
                            "write one with `didbq export` or `didbq binarize`")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _refuse(path, f"was written in packed format version {version} (by didbq "
                            f"{raw.get('didbq_version', '?')}); this didbq reads versions "
                            f"{' and '.join(READABLE_VERSIONS)}: export it again with the didbq that wrote it, or "
                            f"re-run `didbq binarize`")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise _refuse(path, f"corrupted metadata: {', '.join(missing)} missing; write the file again")
    metadata: dict[str, Any] = dict(raw)
    for key in set(raw) - _PLAIN:
        try:
            metadata[key] = json.loads(raw[key])
        except (TypeError, json.JSONDecodeError):
            raise _refuse(path, f"corrupted metadata: {key} is not JSON; write the file again") from None
    if metadata.get("fp_dtype", "float32") not in FP_DTYPES:
        raise _refuse(path, f"corrupted metadata: fp_dtype {metadata.get('fp_dtype')!r}")
    metadata.setdefault("fp_dtype", "float32")
    return metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """The decoded metadata of a packed file, after the header checks (no tensor is read)."""
    header, _ = read_header(path)
    return _metadata(Path(path), header)


def read_packed(path: Path) -> PackedFile:
    """Read a packed file and check its format, version and tensors (verify_hash checks their hash)."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else None
    header, header_bytes = read_header(path, data)
    metadata = _metadata(path, header)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors' own errors: bad dtype, offsets out of range, ...
        raise _refuse(path, f"corrupted tensors ({str(error).splitlines()[0][:120]}); write the file again") from None
    for prefix in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((PACKED, SHAPE, SCALE))}):
        absent = [part for part in (PACKED, SHAPE, SCALE) if f"{prefix}.{part}" not in tensors]
        if absent:
            raise _refuse(path, f"tensor {prefix}.{absent[0]} is missing; write the file again")
    return PackedFile(path, tensors, metadata, len(data), header_bytes)


def verify_hash(packed: PackedFile) -> None:
    """The tensors must match the sha256 the writer put in the header."""
    if tensors_hash(packed.tensors) != packed.metadata["tensors_sha256"]:
        raise _refuse(packed.path, "its tensors do not match the hash in its header (the file was changed or "
                                   "damaged); write the file again")
