"""Recipe matching, the module walker, per-family adapters and the post-swap check."""
from __future__ import annotations

from didbq.convert.adapters import ADAPTERS, AttentionAdapter, supported_families
from didbq.convert.models import build_model
from didbq.convert.plan import Plan, plan
from didbq.convert.recipe import PAPER_DIDB, Recipe, load_recipe, parse_recipe
from didbq.convert.replacements import REPLACEMENTS
from didbq.convert.walker import Conversion, binarize_model, check_conversion, convert

__all__ = ["ADAPTERS", "AttentionAdapter", "Conversion", "PAPER_DIDB", "Plan", "REPLACEMENTS", "Recipe",
           "binarize_model",
           "build_model", "check_conversion", "convert", "load_recipe", "parse_recipe", "plan",
           "supported_families"]
