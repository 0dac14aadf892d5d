"""Recipe targets: a module type name (`Linear`) or `re:<regex>` searched in the qualified module name."""
from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from didbq.convert.routing import original_class


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return _compiled(target[3:]).search(name) is not None
    return original_class(module).__name__ == target


def first_match(targets: list[str], name: str, module: nn.Module) -> str | None:
    return next((t for t in targets if matches(t, name, module)), None)
