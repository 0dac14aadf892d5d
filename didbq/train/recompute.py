"""Recomputing each block's activations in backward (timm's gradient checkpointing) for large inputs.

A binary block keeps more for backward than a float one (each binary product keeps its input, its signs and its
normalised output): vit_base_patch16_sapiens2 at 1024x768 px (3,072 tokens) kept about 1.4 GB per block at a
batch of 2 even with the attention core's own `recompute`, and its training step needed more than 24 GiB. With
timm's per-block checkpointing only each block's input is kept and backward reruns one block at a time: the
step peaked at 13.5 GB. BatchNorm layers inside a checkpointed block
update their running statistics twice per step (forward and rerun), as with any activation checkpointing.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

AUTO_PIXELS = 512 * 512
"""`auto` turns checkpointing on from this many input pixels up (1,024 tokens at patch 16)."""


def wants_grad_checkpointing(setting: bool | Literal["auto"], input_size: tuple[int, int, int]) -> bool:
    """The recipe's `run.grad_checkpointing` for an input of (C, H, W)."""
    return input_size[1] * input_size[2] >= AUTO_PIXELS if setting == "auto" else setting


def enable_grad_checkpointing(model: nn.Module) -> bool:
    """Turn on timm's per-block gradient checkpointing; False where the model does not support it."""
    enable = getattr(model, "set_grad_checkpointing", None)
    if enable is None:
        return False
    try:
        enable(True)
    except (AssertionError, NotImplementedError):  # timm's way of saying a model has no checkpointing
        return False
    return True
