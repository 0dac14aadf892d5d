"""`plan`: what binarizing a model with a recipe does, without training: swaps, kept modules, sizes and OPs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from didbq.convert.recipe import Recipe
from didbq.convert.walker import AttentionSwap, Conversion, KeptModule, Swap, convert
from didbq.report import LayerCost, Totals, measure_costs, state_bytes, totals


@dataclass
class Plan:
    model: nn.Module
    recipe: Recipe
    swaps: list[Swap]
    attention: list[AttentionSwap]
    kept: list[KeptModule]
    layers: list[LayerCost]
    totals: Totals
    warnings: list[str] = field(default_factory=list)
    model_name: str | None = None
    input_size: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Everything in the plan as plain JSON-ready data (what `didbq plan --json` prints)."""
        layers = [layer.as_dict() for layer in self.layers]
        return {
            "model": self.model_name or type(self.model).__name__,
            "input_size": list(self.input_size),
            "recipe": self.recipe.name,
            "replaced": [asdict(s) for s in self.swaps],
            "attention": [asdict(a) for a in self.attention],
            "full_precision": [asdict(k) for k in self.kept],
            "layers": layers,
            "totals": self.totals.as_dict(),
            "warnings": self.warnings,
        }


def plan(model: nn.Module, recipe: Recipe | str, *, strict: bool = True, strict_rules: bool = False,
         model_name: str | None = None) -> Plan:
    """Binarize `model` in place (as binarize_model does) and account for every decision and its cost. The
    measuring pass runs in eval mode (a dry run: no running statistics move, batch norms accept one image)."""
    fp32_bytes = state_bytes(model)
    was_training = model.training
    model.eval()
    try:
        conversion = convert(model, recipe, strict=strict, strict_rules=strict_rules)
        return account(model, conversion, fp32_bytes, model_name)
    finally:
        model.train(was_training)


def account(model: nn.Module, conversion: Conversion, fp32_bytes: int, model_name: str | None = None) -> Plan:
    """The plan of a model already converted (e.g. rebuilt by didbq.load): one forward pass measures its costs
    as its binarization stands now; `fp32_bytes` is the unconverted model's state size."""
    layers = measure_costs(model, conversion.example_input)
    return Plan(model=model, recipe=conversion.recipe, swaps=conversion.swaps, attention=conversion.attention,
                kept=conversion.kept, layers=layers, totals=totals(model, layers, fp32_bytes),
                warnings=conversion.warnings, model_name=model_name,
                input_size=tuple(conversion.example_input.shape[1:]))
