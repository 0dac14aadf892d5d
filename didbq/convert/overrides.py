"""Recipe variants written `recipe[key=value,...]`, accepted wherever a recipe is named (`--recipe`, study
files, benchmarks): one switch without copying a recipe file.

`didb[hfsc=off,local=off]` sets fields of the recipe's `attention:` section; `variant=<preset>` replaces that
whole section by a preset; `linear.<option>=<value>` sets an option of every binary_linear rule and
`conv.<option>=<value>` of every binary_conv2d rule (`conv.depthwise=binary`);
`into.<rule name>=<replacement>` changes what a named rule turns its modules into (`into.MLP activation=rprelu`:
plain instead of token-wise RPReLU); `drop_rule=<rule name>` removes a rule (its modules stay as they are);
`stages=one` trains fully binary only, `stages=two` binary weights first (built from the recipe's last stage,
the same total length); `loss.<key>=<value>`, `optimizer.<key>=<value>` and `schedule.<key>=<value>` set that
key in every stage (`loss.weight_regularization=0`, `optimizer.binarizer_lr=1e-4`); `steps=N` or `epochs=N` the
length of every stage; `data.<key>` a key of the data section (`data.train_limit=2000`), `run.<key>` one of the
run section (`run.grad_checkpointing=true`) and `model.<arg>` a timm.create_model argument (`model.img_size=64`):
a quick run of a recipe as it is.
Values are YAML scalars. The result is the recipe as data, for the caller to adjust and validate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from didbq.convert.recipe import read_recipe_text, recipe_mapping
from didbq.errors import RecipeError

# `<prefix>.<option>=<value>` sets an option of every rule into this replacement
LAYER_PREFIXES = {"linear": "binary_linear", "conv": "binary_conv2d"}


def split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """`name[key=value,...]` -> (name, [(key, raw value), ...])."""
    base, bracket, rest = spec.partition("[")
    if not bracket:
        return spec.strip(), []
    if not rest.endswith("]"):
        raise RecipeError(f"{spec}: overrides must end with ']'")
    pairs = []
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{spec}: override {item!r} is not key=value")
        pairs.append((key.strip(), raw.strip()))
    return base.strip(), pairs


def _rules_named(rules: list[dict[str, Any]], name: str, spec: str) -> list[dict[str, Any]]:
    named = [rule for rule in rules if rule.get("name") == name]
    if not named:
        known = ", ".join(repr(rule["name"]) for rule in rules if rule.get("name")) or "none"
        raise RecipeError(f"{spec}: no rule named {name!r} (named rules: {known})")
    return named


STAGE_COUNTS = {"one": 1, "two": 2}
STAGE_SECTIONS = ("loss", "optimizer", "schedule")  # `loss.KEY=value` and the like set KEY in every stage


def reshaped_stages(stages: list[dict[str, Any]], shape: str, spec: str) -> list[dict[str, Any]]:
    """One stage (fully binary) or two (binary weights, then fully binary) built from the last of `stages` (its
    optimizer, schedule and loss), sharing the recipe's total length evenly."""
    if not stages:
        raise RecipeError(f"{spec}: the recipe declares no stages")
    if shape not in STAGE_COUNTS:
        raise RecipeError(f"{spec}: stages={shape} is not one of {', '.join(STAGE_COUNTS)}")
    last = {**stages[-1], "weights": "binary", "activations": "binary", "init_from": None,
            **_shared_length(stages, STAGE_COUNTS[shape], spec)}
    if shape == "one":
        return [{**last, "name": "fully-binary", "teacher": "teacher"}]
    return [{**last, "name": "binary-weights", "activations": "fp", "teacher": "teacher"},
            {**last, "name": "fully-binary", "init_from": "binary-weights"}]


def _shared_length(stages: list[dict[str, Any]], count: int, spec: str) -> dict[str, Any]:
    """{epochs or steps: the stages' total divided by `count`}."""
    for unit in ("epochs", "steps"):
        lengths = [stage.get(unit) for stage in stages]
        if all(isinstance(length, (int, float)) for length in lengths):
            total = sum(lengths)
            return {unit: total / count if unit == "epochs" else max(1, int(total) // count)}
    raise RecipeError(f"{spec}: to reshape its stages, give every stage its length in epochs, or every one in steps")


def apply_override(data: dict[str, Any], key: str, raw: str, spec: str) -> None:
    """Apply one `key=value` override (see the module docstring) to recipe data, in place."""
    value = yaml.safe_load(raw)
    rules = data.setdefault("binarize", {}).setdefault("rules", [])
    if key == "drop_rule":
        dropped = _rules_named(rules, raw, spec)
        data["binarize"]["rules"] = [rule for rule in rules if rule not in dropped]
    elif key.startswith("into."):
        for rule in _rules_named(rules, key.removeprefix("into."), spec):
            rule["into"] = value
    elif key.partition(".")[0] in LAYER_PREFIXES:
        prefix, _, option = key.partition(".")
        targets = [rule for rule in rules if rule.get("into") == LAYER_PREFIXES[prefix]]
        if not targets:
            raise RecipeError(f"{spec}: the recipe has no {LAYER_PREFIXES[prefix]} rule")
        for rule in targets:
            rule.setdefault("options", {})[option] = value
    elif key == "stages":
        data["stages"] = reshaped_stages(data.get("stages") or [], str(value), spec)
    elif key in ("steps", "epochs"):
        if not data.get("stages"):
            raise RecipeError(f"{spec}: {key} sets the length of every stage, but the recipe declares no stages")
        for stage in data["stages"]:
            stage.update(steps=None, epochs=None)
            stage[key] = value
    elif key.partition(".")[0] in ("data", "run"):
        section, _, field = key.partition(".")
        data.setdefault(section, {})[field] = value
    elif key.startswith("model."):
        data.setdefault("model", {}).setdefault("args", {})[key.removeprefix("model.")] = value
    elif key.partition(".")[0] in STAGE_SECTIONS:
        section, _, field = key.partition(".")
        if not data.get("stages"):
            raise RecipeError(f"{spec}: {key} sets a key of every stage, but the recipe declares no stages")
        for stage in data["stages"]:
            stage.setdefault(section, {})[field] = value
    elif key == "variant":
        data["attention"] = {"variant": value}  # the preset alone: drop the recipe's own settings
    else:
        data.setdefault("attention", {})[key] = value


def recipe_data(spec: str, relative_to: Path | None = None) -> dict[str, Any]:
    """The recipe `spec` names (a file, relative to `relative_to` when it exists there, or a built-in name) as
    data, with its overrides applied; not validated yet."""
    base, overrides = split_spec(spec)
    local = relative_to / base if relative_to is not None else None
    path, text = read_recipe_text(local if local is not None and local.is_file() else base)
    _, data = recipe_mapping(text, str(path))
    for key, raw in overrides:
        apply_override(data, key, raw, spec)
    return data
