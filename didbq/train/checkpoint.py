"""Atomic files: everything didbq writes goes to a temporary name in the same folder and is renamed when
complete, so a run killed at any moment leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from didbq.errors import DidbqError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes it private; give it a new file's mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded with weights_only=True (no pickled code is ever run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: truncated, corrupted, not a checkpoint
        raise DidbqError(f"{path}: cannot read the checkpoint ({type(error).__name__}); "
                         f"start again with --force") from None


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """The model's full state (unpacked) as safetensors; shared tensors are stored once per name."""
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata or {})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file read with weights_only=True (never unpickled code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable for any reason: truncated, corrupted, a pickle with code, ...
        raise DidbqError(f"{path}: cannot read weights ({type(error).__name__}); give a safetensors file or a "
                         f"torch state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DidbqError(f"{path}: not a state dict of tensors")
    return state


def misfits(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Names that are missing, unexpected or of another shape, for an error message."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    return [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own] + wrong


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a complete state dict into `model`; a mismatch names the first misfitting tensors."""
    state = read_weights(path)
    problems = misfits(state, model)
    if problems:
        raise DidbqError(f"{path}: weights do not fit the model ({'; '.join(problems[:3])})")
    model.load_state_dict(state)


def load_fitting(path: Path, model: nn.Module) -> list[str]:
    """Load every tensor whose name and shape fit (e.g. all but a resized head); returns what was skipped."""
    state = read_weights(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))
