"""The packed CPU runtime: binary layers run as popcount kernels on packed weights (see README, "Running a
binary model fast")."""
from __future__ import annotations

import gc
import warnings

from torch import nn

from didbq.errors import DidbqError
from didbq.runtime.build import Kernels, kernels, require_kernels, unavailable_reason
from didbq.runtime.modules import PackedBinaryLinear, pack_for_inference, packable
from didbq.train.allocator import release_freed_memory

RUNTIMES = ("auto", "packed", "reference")
_warned = {"fallback": False}

__all__ = ["RUNTIMES", "Kernels", "PackedBinaryLinear", "kernel_name", "kernels", "pack_for_inference",
           "packable", "require_kernels", "unavailable_reason", "use_runtime"]


def kernel_name() -> str:
    """The kernel code path in use (avx512, avx2, portable), or "none (float path)"."""
    loaded = kernels()
    return loaded.selected if loaded is not None else "none (float path)"


def use_runtime(model: nn.Module, runtime: str = "auto") -> nn.Module:
    """Put a binary model (loaded or just trained) on the chosen runtime, in place, in eval mode:
    - reference: the float path (binary values as floats, torch's float kernels);
    - packed: packed weights and popcount kernels; an error if the kernels cannot be built here;
    - auto: packed when the kernels are available, else the float path with one warning saying why."""
    if runtime not in RUNTIMES:
        raise DidbqError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "reference":
        return model.eval()
    if runtime == "auto" and kernels() is None:
        if not _warned["fallback"]:
            _warned["fallback"] = True
            warnings.warn(f"didbq: running on the float path: {unavailable_reason()}", stacklevel=2)
        return model.eval()
    require_kernels()
    pack_for_inference(model)
    gc.collect()  # the float weights the packed layers replaced
    release_freed_memory()
    return model
