"""Walk a timm model, decide what every module becomes, probe the full-precision model, swap, and check.

Order: find attention modules (strict about unknown classes) -> match rules -> probe one forward pass of the
full-precision model to record input shapes and attention geometry -> build replacements and cores -> run the
converted model once and require that every binary layer and every core ran and the outputs are finite.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from didbq.convert.adapters import (
    ADAPTERS,
    FULL_PRECISION_MIXERS,
    FULL_PRECISION_PARTS,
    AttentionAdapter,
    class_key,
    found_adapter,
    looks_like_attention,
)
from didbq.convert.matching import first_match
from didbq.convert.recipe import Recipe, Rule, load_recipe
from didbq.convert.replacements import REPLACEMENTS, SeenInput
from didbq.convert.routing import (
    CORE_ATTRIBUTE,
    ProductEvent,
    ProductLog,
    explicit_attention,
    original_class,
    route,
    unroute,
)
from didbq.errors import ConversionCheckError, RecipeError, UnsupportedModelError
from didbq.nn.attention import ATTENTION_VARIANTS, BinaryAttention
from didbq.nn.binary import BinaryLayer
from didbq.nn.haar import TokenLayout
from didbq.observe import fresh_cores, run_observed


@dataclass
class Swap:
    name: str
    original_type: str
    into: str
    rule: str
    note: str = ""


@dataclass
class AttentionSwap:
    name: str
    original_type: str
    family: str
    route: str
    variant: str
    heads: int
    queries: int
    keys: int
    disabled_parts: list[str]


@dataclass
class KeptModule:
    name: str
    type: str
    reason: str
    parameters: int


@dataclass
class Conversion:
    """What binarize_model did: the model plus the decisions that `plan` and the report present."""

    model: nn.Module
    recipe: Recipe
    swaps: list[Swap] = field(default_factory=list)
    attention: list[AttentionSwap] = field(default_factory=list)
    kept: list[KeptModule] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    example_input: torch.Tensor | None = None


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was built for: its patch embedding's size where it records one
    (a model built with img_size=... or in_chans=...), else its pretrained_cfg."""
    from timm.data import resolve_model_data_config

    channels, height, width = resolve_model_data_config(model)["input_size"]
    patch_embed = getattr(model, "patch_embed", None)
    if isinstance(patch_embed, nn.Module):  # its first convolution sees the image (volo: a stem before proj)
        stem = next((m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        channels = stem.in_channels if stem is not None else channels
    for owner in (patch_embed, model):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int):
            return channels, size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return channels, size[0], size[1]
    return channels, height, width


def example_input_for(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random batch at the size the model was built for."""
    channels, height, width = model_input_size(model)
    reference = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, height, width, generator=generator).to(reference.device, reference.dtype)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _is_attention(module: nn.Module) -> bool:
    cls = original_class(module)
    return class_key(cls) in ADAPTERS or looks_like_attention(cls)


def _wraps_attention(module: nn.Module) -> bool:
    """A block-level wrapper named like attention (maxxvit's PartitionAttention2d): the attention is inside it."""
    return any(_is_attention(child) for child in module.modules() if child is not module)


def _own_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


class _Walk:
    """The decisions for one model and recipe, before anything is swapped."""

    def __init__(self, model: nn.Module, recipe: Recipe, strict: bool) -> None:
        self.model, self.recipe, self.strict = model, recipe, strict
        self.attention: dict[str, AttentionAdapter] = {}
        self.planned: dict[str, Rule] = {}
        self.skipped: dict[str, str] = {}  # subtree root -> reason it stays full precision
        self.rule_hits = {id(rule): 0 for rule in recipe.binarize.rules}
        self._decide()

    def _ignored_by(self, name: str, module: nn.Module) -> str | None:
        for entry in self.recipe.binarize.ignore:
            if first_match([entry.target], name, module):
                return entry.reason
        leaf = name.rpartition(".")[2]
        return FULL_PRECISION_PARTS.get(leaf)

    def _decide(self) -> None:
        inside: list[str] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(prefix + ".") for prefix in inside):
                continue
            reason = self._ignored_by(name, module)
            if reason is not None:
                self.skipped[name] = reason
                inside.append(name)
                continue
            cls = original_class(module)
            key = class_key(cls)
            if key in ADAPTERS:
                self.attention[name] = ADAPTERS[key]
            elif looks_like_attention(cls) and not _wraps_attention(module):
                self.attention[name] = found_adapter(cls)
            rule = next((r for r in self.recipe.binarize.rules if first_match(r.targets, name, module)), None)
            if rule is not None and name not in self.attention:
                self.planned[name] = rule
                self.rule_hits[id(rule)] += 1
                inside.append(name)

    def unmatched_rules(self) -> list[Rule]:
        return [rule for rule in self.recipe.binarize.rules if self.rule_hits[id(rule)] == 0]


Probed = tuple[dict[str, SeenInput], dict[str, BinaryAttention], dict[str, list[ProductEvent]]]


def _probe(model: nn.Module, walk: _Walk, example: torch.Tensor) -> Probed:
    """One full-precision forward pass: input shapes of planned modules, the geometry of each attention, and what
    each found attention class computes (the products and softmaxes of its forward)."""
    seen: dict[str, SeenInput] = {}
    hooks = []
    for name in [*walk.planned, *walk.attention]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if tensor is not None and name not in seen:
                seen[name] = SeenInput(tuple(tensor.shape), tensor.device, tensor.dtype, tensor is example)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    recorders: dict[str, BinaryAttention] = {}
    events: dict[str, list[ProductEvent]] = {}
    for name, adapter in walk.attention.items():
        module = model.get_submodule(name)
        adapter.prepare(module)
        recorders[name] = BinaryAttention(ATTENTION_VARIANTS["softmax"], 1, 1, TokenLayout(), 1, 1)
        events[name] = []
        route(module, recorders[name], adapter.forward,
              ProductLog(recorders[name], events[name]) if adapter.found else "sdpa")
    try:
        run_observed(model, example, hooks)
    finally:
        for name in walk.attention:
            unroute(model.get_submodule(name))
    return seen, recorders, events


def _settle_routes(model: nn.Module, walk: _Walk, recorders: dict[str, BinaryAttention],
                   events: dict[str, list[ProductEvent]], conversion: Conversion) -> dict[str, str]:
    """The route of every attention module. A found class takes the SDPA route if its forward called SDPA, the
    explicit route if it computed softmax(q kᵀ) v by hand; one with no product of activations is a gate or an
    elementwise mixer and a known other mixer stays full precision (both listed in the plan); anything else is an
    unsupported class (an error in strict mode)."""
    routes = {}
    for name, adapter in list(walk.attention.items()):
        if not adapter.found or recorders[name].last_call is not None:
            routes[name] = adapter.route
        elif explicit_attention(events[name]):
            _record_geometry(recorders[name], events[name])
            routes[name] = "explicit"
        else:
            module = model.get_submodule(name)
            reason = _unrouted_reason(name, original_class(module), events[name], walk.strict)
            conversion.kept.append(KeptModule(name, original_class(module).__name__, reason,
                                              _own_parameter_count(module)))
            del walk.attention[name]
    return routes


def _record_geometry(recorder: BinaryAttention, events: list[ProductEvent]) -> None:
    """The call record of an explicit-route class, from its first q @ kᵀ and probs @ v as the probe saw them."""
    q_shape, kt_shape, _ = events[0].shapes
    left, right, _ = next(event for event in events[1:] if event.kind == "product").shapes
    probs_first = left[-2:] == events[0].shapes[2][-2:]
    value_dim = right[-1] if probs_first else left[-2]
    q, k = (torch.empty(shape, device="meta") for shape in (q_shape, (*kt_shape[:-2], kt_shape[-1], kt_shape[-2])))
    if q.dim() == 3:
        q, k = q.unsqueeze(-3), k.unsqueeze(-3)
    recorder.record_call(q, k, torch.empty(*k.shape[:-1], value_dim, device="meta"))


def _unrouted_reason(name: str, cls: type, events: list[ProductEvent], strict: bool) -> str:
    if not any(event.kind == "product" for event in events):
        return "token mixer without products of activations (a gate or elementwise mixing): full precision"
    key = class_key(cls)
    if key in FULL_PRECISION_MIXERS:
        return f"{FULL_PRECISION_MIXERS[key]}: full precision"
    message = (f"{name}: attention class {key} is not supported: its forward neither calls "
               f"F.scaled_dot_product_attention nor computes softmax(q kᵀ) v; pass strict=False (CLI: --no-strict) "
               f"to binarize only its linear layers and keep its products in full precision")
    if strict:
        raise UnsupportedModelError(message)
    warnings.warn(message, stacklevel=4)
    return "unsupported attention class (--no-strict): products in full precision"


def _build_core(model: nn.Module, name: str, adapter: AttentionAdapter, recorder: BinaryAttention,
                seen: SeenInput | None, recipe: Recipe) -> BinaryAttention:
    call = recorder.last_call
    if call is None:
        raise ConversionCheckError(
            f"{name}: its attention products never reached didbq during the probe (route {adapter.route}); "
            f"this timm version computes attention in a way the {adapter.family} adapter does not know")
    module = model.get_submodule(name)
    layout = adapter.layout(model, call["queries"])
    attn_input = seen.shape if seen is not None else None
    # HFSC's added projection reads the attention input, so it needs x as [B, N, C] with the query tokens.
    plain_tokens = attn_input is not None and len(attn_input) == 3 and call["query_dims"] == 4
    in_features = attn_input[-1] if plain_tokens and attn_input[-2] == call["queries"] else None
    core = BinaryAttention(recipe.attention.resolve(), call["heads"], call["head_dim"], layout,
                           call["queries"], call["keys"], in_features, adapter.qk_weight(module))
    return core.to(seen.device, seen.dtype) if seen is not None else core


def _swap_modules(model: nn.Module, walk: _Walk, seen: dict[str, SeenInput], conversion: Conversion) -> None:
    for name, rule in walk.planned.items():
        module = model.get_submodule(name)
        if name not in seen:
            conversion.kept.append(KeptModule(name, original_class(module).__name__, "never runs in forward",
                                              sum(p.numel() for p in module.parameters())))
            continue
        replacement = REPLACEMENTS[rule.into]
        if not isinstance(module, replacement.accepts):
            raise RecipeError(f"rule {rule.label!r}: {name} is a {type(module).__name__}, but {rule.into} replaces "
                              f"only {', '.join(c.__name__ for c in replacement.accepts)}")
        options = replacement.options.model_validate(rule.options)  # validated with the recipe already
        reason = replacement.keeps(module, seen[name], options)
        if reason is not None:
            conversion.kept.append(KeptModule(name, original_class(module).__name__, reason,
                                              sum(p.numel() for p in module.parameters())))
            continue
        new = replacement.build(module, seen[name].shape, options).to(seen[name].device, seen[name].dtype)
        new.train(module.training)  # the model is in eval mode here: no running statistics from the check's input
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, new)
        conversion.swaps.append(Swap(name, original_class(module).__name__, rule.into, rule.label,
                                     getattr(new, "shortcut_note", "")))


def _list_kept(model: nn.Module, walk: _Walk, conversion: Conversion) -> None:
    """Every module with its own parameters that stays full precision, and why."""
    converted = [s.name for s in conversion.swaps]
    listed = {kept.name for kept in conversion.kept}
    for name, module in model.named_modules():
        count = _own_parameter_count(module)
        if not count or name in listed or isinstance(module, BinaryLayer) or any(
                name == c or name.startswith(c + ".") for c in converted):
            continue
        if CORE_ATTRIBUTE in name.split("."):
            continue
        root = next((s for s in walk.skipped if name == s or name.startswith(s + ".")), None)
        if root is not None:
            reason = walk.skipped[root]
        elif not name:
            reason = "tokens and position embeddings"
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or "norm" in type(module).__name__.lower():
            reason = "normalisation"
        elif name in walk.attention:
            reason = "attention scalars (scale, bias tables, temperature)"
        else:
            reason = f"no rule matches {original_class(module).__name__}"
        conversion.kept.append(KeptModule(name or "(model)", original_class(module).__name__, reason, count))


def check_conversion(model: nn.Module, example: torch.Tensor) -> None:
    """Run `model` once; every binary layer and core must run and the output must be finite."""
    called: set[str] = set()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, BinaryLayer)}
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
             for name, module in linears.items()]
    cores = fresh_cores(model)  # adapters may call the core's steps rather than the core itself
    output = run_observed(model, example, hooks)
    called.update(name for name, core in cores.items() if core.last_call is not None)
    silent = sorted((set(linears) | set(cores)) - called)
    if silent:
        raise ConversionCheckError(f"{len(silent)} binary layers never ran after the swap (they would stay full "
                                   f"precision silently): {', '.join(silent[:5])}")
    outputs = output if isinstance(output, (tuple, list)) else [output]
    if not all(torch.isfinite(o).all() for o in outputs if isinstance(o, torch.Tensor)):
        raise ConversionCheckError("the converted model produced non-finite outputs on a random input")


def convert(model: nn.Module, recipe: Recipe | str, *, strict: bool = True, strict_rules: bool = False,
            example_input: torch.Tensor | None = None) -> Conversion:
    """Binarize `model` in place following `recipe`; returns the model and every decision made."""
    recipe = load_recipe(recipe)
    was_training = model.training
    model.eval()
    example = example_input if example_input is not None else example_input_for(model)
    walk = _Walk(model, recipe, strict)
    conversion = Conversion(model, recipe, example_input=example)
    for rule in (rule for rule in walk.unmatched_rules() if not rule.optional):
        message = f"rule {rule.label!r} matches no module of {type(model).__name__}"
        if strict_rules:
            raise RecipeError(message + " (--strict-rules)")
        conversion.warnings.append(message)
    seen, recorders, events = _probe(model, walk, example)
    routes = _settle_routes(model, walk, recorders, events, conversion)
    cores = {name: _build_core(model, name, walk.attention[name], recorders[name], seen.get(name), recipe)
             for name in walk.attention}
    _swap_modules(model, walk, seen, conversion)
    variant = recipe.attention.variant
    for name, core in cores.items():
        module = model.get_submodule(name)
        adapter = walk.attention[name]
        call = recorders[name].last_call
        conversion.attention.append(AttentionSwap(name, original_class(module).__name__, adapter.family,
                                                  routes[name], variant, core.heads, call["queries"], call["keys"],
                                                  core.disabled_parts))
        route(module, core, adapter.forward, routes[name])
    _list_kept(model, walk, conversion)
    check_conversion(model, example)
    model.train(was_training)
    return conversion


def binarize_model(model: nn.Module, recipe: Recipe | str, *, strict: bool = True,
                   strict_rules: bool = False) -> nn.Module:
    """Binarize a timm model in place following a recipe (a path, a built-in name or a Recipe); returns it."""
    return convert(model, recipe, strict=strict, strict_rules=strict_rules).model
