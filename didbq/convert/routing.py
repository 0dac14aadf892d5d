"""Sending a timm attention module's products through a didbq core without copying its forward.

Most timm attention classes end in `F.scaled_dot_product_attention(q, k, v, attn_mask=..., scale=...)` when
`fused_attn` is set, with relative position bias and shifted-window masks already folded into the mask. A
converted module's class becomes a subclass whose forward runs the original one under a TorchFunctionMode that
hands that call to `self.binary_core`. Classes that compute `softmax(q @ kᵀ ...) @ v` by hand take the explicit
route: the same mode hands the first product of two activations to `core.scores` and the second to
`core.aggregate` (the class's own scale, position bias, masks and head mixing run in between, unchanged). The
probe (`ProductLog`) tells which route a class takes from what its forward does. Classes with an explicit softmax
that neither route fits get an adapter forward instead.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

CORE_ATTRIBUTE = "binary_core"
ROUTE_ATTRIBUTE = "binary_route"

MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm})
SOFTMAXES = frozenset({torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax})
Route = Literal["sdpa", "explicit"]


def _activation_product(func: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """A matrix product of two activations (batched, so not a weight), e.g. q @ kᵀ or probs @ v."""
    return (func in MATMULS and len(args) >= 2
            and all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in args[:2]))


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class SDPARoute(TorchFunctionMode):
    """Within this mode, F.scaled_dot_product_attention calls `core` instead; with `explicit`, the first product
    of two activations (q @ kᵀ) goes to `core.scores` and the next (probs @ v, or v @ probsᵀ) to `core.aggregate`
    and `core.context`."""

    def __init__(self, core: nn.Module, explicit: bool = False) -> None:
        super().__init__()
        self.core, self.explicit = core, explicit
        self._qk: tuple[torch.Tensor, torch.Tensor, torch.Size] | None = None
        self._probs_storage: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.core(*args, **kwargs)
        if not self.explicit:
            return func(*args, **kwargs)
        if _activation_product(func, args):
            return self._scores(args[0], args[1]) if self._qk is None else self._aggregate(args[0], args[1])
        out = func(*args, **kwargs)
        if func in SOFTMAXES and isinstance(out, torch.Tensor):
            self._probs_storage = _storage(out)
        return out

    def _scores(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b read as q @ kᵀ: binary scores from the core (heads on dim -3; a 3-D product is one head)."""
        flat = a.dim() == 3
        q, k = (a.unsqueeze(-3), b.unsqueeze(-3)) if flat else (a, b)
        k = k.transpose(-2, -1)
        scores = self.core.scores(q, k, 1.0)
        self._qk = (q, k, scores.shape)
        return scores.squeeze(-3) if flat else scores

    def _aggregate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """probs @ v, or v @ probsᵀ (levit_conv's layout): the binarized probabilities aggregate binary v."""
        q, k, shape = self._qk
        self._qk = None
        flat = a.dim() == 3
        if flat:
            a, b = a.unsqueeze(-3), b.unsqueeze(-3)
        queries, keys = shape[-2:]
        first = a.shape[-2:] == (queries, keys) and b.shape[-2] == keys
        second = b.shape[-2:] == (keys, queries) and a.shape[-1] == keys
        if first and second:  # v's width equals the query count: the operand softmax wrote is the probabilities
            first = _storage(a) == self._probs_storage or _storage(b) != self._probs_storage
        if not (first or second):
            raise RuntimeError(f"attention product of {tuple(a.shape)} and {tuple(b.shape)} does not fit scores "
                               f"{tuple(shape)}: this class does not compute softmax(q kᵀ) v")
        probs, v = (a, b) if first else (b.transpose(-2, -1), a.transpose(-2, -1))
        out = self.core.context(self.core.aggregate(self.core.prob_binarizer(probs), v), q, k, v)
        out = out if first else out.transpose(-2, -1).contiguous()  # a product's result is contiguous: views follow
        return out.squeeze(-3) if flat else out


@dataclass
class ProductEvent:
    """What the probe saw: a product of two activations (shapes of both and of the result) or a softmax."""

    kind: Literal["product", "softmax"]
    shapes: tuple[tuple[int, ...], ...]
    last_dim: bool = True


class ProductLog(SDPARoute):
    """The probe's mode: F.scaled_dot_product_attention goes to the (full-precision) core as on the SDPA route;
    products of activations and softmaxes run as they are and are logged, to recognise the explicit route."""

    def __init__(self, core: nn.Module, events: list[ProductEvent]) -> None:
        super().__init__(core)
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch protocol)
        out = super().__torch_function__(func, types, args, kwargs)
        if _activation_product(func, args):
            self.events.append(ProductEvent("product", (tuple(args[0].shape), tuple(args[1].shape),
                                                        tuple(out.shape))))
        elif func in SOFTMAXES and isinstance(out, torch.Tensor):
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else None)
            last = dim is not None and dim in (-1, out.dim() - 1)
            self.events.append(ProductEvent("softmax", (tuple(out.shape),), last))
        return out


def explicit_attention(events: list[ProductEvent]) -> bool:
    """Whether the logged events are softmax attention done by hand: (q @ kᵀ, softmax over keys, probs @ v) once
    or more, the softmax over the scores' shape (more softmaxes may follow it: convit's gated position scores) and
    the second product taking the probabilities (or their transpose) as one operand."""
    index, groups = 0, 0
    while index < len(events):
        scores = events[index]
        softmaxes = 0
        while index + 1 + softmaxes < len(events) and events[index + 1 + softmaxes].kind == "softmax":
            softmaxes += 1
        end = index + 1 + softmaxes
        if scores.kind != "product" or not softmaxes or end >= len(events) or events[end].kind != "product":
            return False
        shape, softmax, (left, right, _) = scores.shapes[2], events[index + 1], events[end].shapes
        if not softmax.last_dim or softmax.shapes[0][-2:] != shape[-2:]:
            return False
        if left[-2:] != shape[-2:] and right[-2:] != shape[-2:][::-1]:
            return False
        index, groups = end + 1, groups + 1
    return groups > 0


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
            with _mode(self, core):
                return cls.forward(self, *args, **kwargs)
        finally:
            core.set_attention_input(None)

    unique = f"Binary_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
    routed = type(f"Binarized{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    routed.__qualname__ = unique
    setattr(sys.modules[__name__], unique, routed)
    _routed_classes[cls] = routed
    return routed


def _mode(module: nn.Module, core: nn.Module) -> SDPARoute:
    route_taken = getattr(module, ROUTE_ATTRIBUTE, "sdpa")
    return route_taken if isinstance(route_taken, ProductLog) else SDPARoute(core, route_taken == "explicit")


def original_class(module: nn.Module) -> type[nn.Module]:
    """The timm class behind a routed module (the module's own class if it is not routed)."""
    cls = type(module)
    return cls.__bases__[0] if cls in _routed_classes.values() else cls


def route(module: nn.Module, core: nn.Module, adapter_forward: Callable[..., torch.Tensor] | None,
          route_taken: Route | ProductLog = "sdpa") -> None:
    """Attach `core` to an attention module and make its forward use it (a ProductLog: the probe's)."""
    cls = original_class(module)
    setattr(module, CORE_ATTRIBUTE, core)
    setattr(module, ROUTE_ATTRIBUTE, route_taken)
    module.__class__ = routed_class(cls, adapter_forward)


def unroute(module: nn.Module) -> None:
    """Undo `route`: the module gets its timm class back and loses its core."""
    module.__class__ = original_class(module)
    for attribute in (CORE_ATTRIBUTE, ROUTE_ATTRIBUTE):
        if hasattr(module, attribute):
            delattr(module, attribute)
