"""Building timm models by name, with errors a user can act on."""
from __future__ import annotations

import difflib
import re
from typing import Any

import timm
from torch import nn

from didbq.errors import DidbqError, UnsupportedModelError


def resolve_model_name(name: str) -> str:
    """timm's name for `name`: the name itself when timm knows it; for a prefix of timm names (`deit_small`), the
    canonical default among them: the one `<name>_patch<P>_224` (patch 16 where there are several, not the
    distilled or 384 variants), or the only model with that prefix. Otherwise a one-line error: the candidates
    when there is no clear default, close names (same family first) when nothing starts with it."""
    architecture, tag = timm.models.split_model_name_tag(name)
    if timm.is_model(architecture):
        return name
    candidates = timm.list_models(f"{architecture}_*")
    if not candidates:
        raise UnsupportedModelError(f"unknown timm model {name!r}{_suggestions(architecture)}")
    plain = [c for c in candidates if re.fullmatch(rf"{re.escape(architecture)}_patch\d+_224", c)]
    if len(plain) > 1:
        plain = [c for c in plain if c.endswith("_patch16_224")]
    chosen = plain[0] if len(plain) == 1 else candidates[0] if len(candidates) == 1 else None
    if chosen is None:
        listed = ", ".join(candidates[:8]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 8 else "")
        raise UnsupportedModelError(f"{name!r} is not a timm model and has no clear default among the models it "
                                    f"starts: {listed}; give one of them")
    return f"{chosen}.{tag}" if tag else chosen


def _suggestions(architecture: str) -> str:
    """'; did you mean ...?' with models of the same family (the name's first word) first, then close names."""
    models = timm.list_models()
    family = [m for m in models if m.split("_")[0] == architecture.split("_")[0]]
    similarity = {m: difflib.SequenceMatcher(None, architecture, m).ratio() for m in family}
    ranked = sorted(family, key=lambda m: -similarity[m])[:4]
    close = difflib.get_close_matches(architecture, models, n=4, cutoff=0.6)
    picks = list(dict.fromkeys([*ranked, *close]))[:4]
    return f"; did you mean {', '.join(picks)}?" if picks else "; see `timm.list_models()`"


def build_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model with short names resolved (resolve_model_name), a one-line error for unknown names
    (suggesting close ones) and offline hubs."""
    name = resolve_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if pretrained:
            raise DidbqError(f"cannot load pretrained weights for {name} ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:160]}); go online, or give a local checkpoint") from None
        raise DidbqError(f"timm cannot build {name} with {kwargs or 'default arguments'}: "
                         f"{str(error).splitlines()[0][:200]}") from None
