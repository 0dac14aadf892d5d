"""Damaged and foreign versions of a good packed file, for the loader and CLI tests (imported by both;
tests/conftest.py puts this folder on sys.path)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from didbq.export.format import FORMAT_VERSION, READABLE_VERSIONS

UNREAD_OLDER = str(int(READABLE_VERSIONS[0]) - 1)  # a version before the oldest this didbq reads

# case -> what the one-line error must say
BAD_FILES = {
    "truncated": "is truncated",
    "corrupted header": "not a safetensors file, or its header is corrupted",
    "tensor missing": "tensor blocks.1.mlp.fc2.weight_scale is missing",
    "another tensor missing": "norm.bias missing",
    "not safetensors": "is not a safetensors file",
    "pickle": "never unpickles",
    "raw pickle": "never unpickles",
    "older version": f"format version {UNREAD_OLDER}",
    "newer version": f"format version {FORMAT_VERSION + 1}",
    "another model": "(blocks.2.",
    "changed tensors": "do not match the hash",
    "plain safetensors": "not a didbq packed file",
}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def rewrite(source: Path, target: Path, metadata: dict[str, str] | None = None, drop: str | None = None,
            change: str | None = None) -> Path:
    """`source` written again with metadata entries replaced, a tensor dropped or changed (the hash kept)."""
    tensors = load_file(str(source))
    if drop is not None:
        del tensors[drop]
    if change is not None:
        tensors[change] = tensors[change] + 1
    save_file(tensors, str(target), metadata={**_metadata(source), **(metadata or {})})
    return target


class _Trap:
    """A pickle whose loading would create a file: proof that didbq never unpickles what it is given."""

    def __init__(self, folder: Path) -> None:
        self.marker = str(folder / "UNPICKLED")

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def bad_file(case: str, good: Path, folder: Path) -> Path:
    """A damaged or foreign version of `good`, a packed file of a model with at least two blocks (written under
    `folder`); loading it must fail with BAD_FILES[case] and must never create folder/UNPICKLED."""
    path = folder / f"{case.replace(' ', '_')}.safetensors"
    data = good.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif case == "corrupted header":
        path.write_bytes(data[:8] + b"#" + data[9:])
    elif case == "tensor missing":
        rewrite(good, path, drop="blocks.1.mlp.fc2.weight_scale")
    elif case == "another tensor missing":
        rewrite(good, path, drop="norm.bias")
    elif case == "not safetensors":
        path.write_text("name,label\ncat,1\n" * 40)
    elif case == "pickle":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif case == "raw pickle":
        path.write_bytes(pickle.dumps(_Trap(folder), protocol=2))
    elif case == "older version":
        rewrite(good, path, {"format_version": UNREAD_OLDER})
    elif case == "newer version":
        rewrite(good, path, {"format_version": str(FORMAT_VERSION + 1)})
    elif case == "another model":  # the same architecture one block deeper
        arguments = json.loads(_metadata(good)["model_args"])
        rewrite(good, path, {"model_args": json.dumps({**arguments, "depth": arguments.get("depth", 2) + 1})})
    elif case == "changed tensors":
        rewrite(good, path, change="norm.weight")
    elif case == "plain safetensors":
        save_file({"w": torch.ones(2)}, str(path))
    else:
        raise KeyError(case)
    return path
