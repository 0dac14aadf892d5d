"""Building timm models by name, with errors a user can act on."""
from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from didbq.errors import DidbqError, UnsupportedModelError


def build_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model with a one-line error for unknown names (suggesting close ones) and offline hubs."""
    architecture, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise UnsupportedModelError(f"unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if pretrained:
            raise DidbqError(f"cannot load pretrained weights for {name} ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:160]}); go online, or give a local checkpoint") from None
        raise DidbqError(f"timm cannot build {name} with {kwargs or 'default arguments'}: "
                         f"{str(error).splitlines()[0][:200]}") from None
