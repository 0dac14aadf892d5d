"""Running a model once to observe it: with hooks that are always removed, and with fresh core records."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from didbq.nn.attention import BinaryAttention


def run_observed(model: nn.Module, example: torch.Tensor, handles: Iterable[RemovableHandle]) -> Any:
    """One no-grad forward pass; the hooks behind `handles` are removed afterwards, even on error."""
    try:
        with torch.no_grad():
            return model(example)
    finally:
        for handle in handles:
            handle.remove()


def fresh_cores(model: nn.Module) -> dict[str, BinaryAttention]:
    """The model's attention cores with their last-call records cleared, so the next pass shows which ran."""
    cores = {name: m for name, m in model.named_modules() if isinstance(m, BinaryAttention)}
    for core in cores.values():
        core.last_call = None
    return cores
