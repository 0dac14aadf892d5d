"""Sending a timm attention module's products through a didbq core without copying its forward.

Most timm attention classes end in `F.scaled_dot_product_attention(q, k, v, attn_mask=..., scale=...)` when
`fused_attn` is set, with relative position bias and shifted-window masks already folded into the mask. A
converted module's class becomes a subclass whose forward runs the original one under a TorchFunctionMode that
hands that call to `self.binary_core`. Classes with an explicit softmax get an adapter forward instead.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

CORE_ATTRIBUTE = "binary_core"


class SDPARoute(TorchFunctionMode):
    """Within this mode, F.scaled_dot_product_attention calls `core` instead."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.core(*args, **kwargs)
        return func(*args, **kwargs)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


_routed_classes: dict[type, type] = {}


def routed_class(cls: type[nn.Module], adapter_forward: Callable[..., torch.Tensor] | None) -> type[nn.Module]:
    """The subclass of `cls` whose forward runs through `binary_core` (one class per original class).

    The subclass is published in this module under a unique name so that pickling and deepcopy find it.
    """
    if cls in _routed_classes:
        return _routed_classes[cls]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        core = getattr(self, CORE_ATTRIBUTE)
        core.set_attention_input(_first_tensor(args, kwargs))
        try:
            if adapter_forward is not None:
                return adapter_forward(self, *args, **kwargs)
            with SDPARoute(core):
                return cls.forward(self, *args, **kwargs)
        finally:
            core.set_attention_input(None)

    unique = f"Binary_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
    routed = type(f"Binarized{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    routed.__qualname__ = unique
    setattr(sys.modules[__name__], unique, routed)
    _routed_classes[cls] = routed
    return routed


def original_class(module: nn.Module) -> type[nn.Module]:
    """The timm class behind a routed module (the module's own class if it is not routed)."""
    cls = type(module)
    return cls.__bases__[0] if cls in _routed_classes.values() else cls


def route(module: nn.Module, core: nn.Module, adapter_forward: Callable[..., torch.Tensor] | None) -> None:
    """Attach `core` to an attention module and make its forward use it."""
    cls = original_class(module)
    setattr(module, CORE_ATTRIBUTE, core)
    module.__class__ = routed_class(cls, adapter_forward)


def unroute(module: nn.Module) -> None:
    """Undo `route`: the module gets its timm class back and loses its core."""
    module.__class__ = original_class(module)
    if hasattr(module, CORE_ATTRIBUTE):
        delattr(module, CORE_ATTRIBUTE)
