"""Make `import timm` work where torchvision's compiled ops cannot load beside the installed torch.

timm imports torchvision, and torchvision registers fake kernels for `torchvision::nms` at import time; if its
`_C` extension was built for another torch (the CPU torch 2.13 with the only torchvision 0.28 wheel here), that
fails with "operator torchvision::nms does not exist". We first try to load the real extension (so a matching
install keeps its kernels), and only if that fails define the two schemas torchvision's import needs. didbq never
calls those ops.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

_guard_library: torch.library.Library | None = None
_done = False


def _torchvision_extensions() -> list[str]:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = list(spec.submodule_search_locations)[0]
    return glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))


def ensure_torchvision_importable() -> None:
    """Run once before anything imports torchvision or timm."""
    global _guard_library, _done
    if _done:
        return
    _done = True
    for extension in _torchvision_extensions():
        try:
            torch.ops.load_library(extension)
            return
        except (OSError, RuntimeError):
            continue
    if not _torchvision_extensions():
        return  # no torchvision at all: timm's own import error will say so
    _guard_library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _guard_library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
