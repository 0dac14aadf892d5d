"""The recipe schema (pydantic, unknown keys are errors) and its loader with file/line/key-path messages."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from didbq.errors import DidbqError, RecipeError
from didbq.nn.attention import ATTENTION_VARIANTS, AttentionOptions

BUILTIN_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# DIDB-ViT as the paper has it; recipes/didb.yaml turns off what the Fashion-MNIST study measured worse.
PAPER_DIDB = "didb[stages=two,aggregation=diba,differential=true,hfsc=separate]"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_target(target: str) -> str:
    if target.startswith("re:"):
        try:
            re.compile(target[3:])
        except re.error as error:
            raise ValueError(f"invalid regular expression {target[3:]!r}: {error}") from None
    elif not target.isidentifier():
        raise ValueError(f"{target!r} is neither a module type name nor a 're:' regex")
    return target


class Target(Strict):
    """A module type name (e.g. `Linear`) or `re:<regex>` searched in the qualified module name."""

    target: str
    reason: str = "ignored by the recipe"

    _check = field_validator("target")(_check_target)


def _as_target(value: Any) -> Any:
    return {"target": value} if isinstance(value, str) else value


class Rule(Strict):
    """Replace every module matching one of `targets` (first matching rule wins) with `into`."""

    name: str | None = Field(None, description="label shown in the plan; defaults to the targets")
    targets: list[str] = Field(min_length=1)
    into: str = Field(description="a registered replacement: binary_linear, binary_conv2d, rprelu, token_rprelu, "
                                  "identity, layer_scale, batchnorm")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the replacement")
    optional: bool = Field(False, description="a rule for modules some models lack (hybrids' convolutions): no "
                                              "warning (nor --strict-rules error) when it matches nothing")

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: list[str]) -> list[str]:
        return [_check_target(t) for t in targets]

    @model_validator(mode="after")
    def _replacement(self) -> "Rule":
        from didbq.convert.replacements import REPLACEMENTS

        try:
            replacement = REPLACEMENTS[self.into]
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        try:
            replacement.options.model_validate(self.options)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"options.{where}: {_describe(first, replacement.options)}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or ", ".join(self.targets)


class Binarize(Strict):
    rules: list[Rule] = Field(default_factory=list)
    ignore: list[Target] = Field(default_factory=list, description="subtrees that stay full precision")

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore(cls, value: Any) -> Any:
        return [_as_target(v) for v in value] if isinstance(value, list) else value


class Attention(AttentionOptions):
    """`variant` picks a preset of didbq.nn.attention; any other field overrides it."""

    variant: str = "didb"

    @field_validator("variant")
    @classmethod
    def _variant(cls, name: str) -> str:
        try:
            ATTENTION_VARIANTS[name]
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        return name

    def resolve(self) -> AttentionOptions:
        overrides = self.model_dump(exclude={"variant"}, exclude_unset=True)
        return ATTENTION_VARIANTS[self.variant].model_copy(update=overrides)


class Optimizer(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    scale_lr_with_batch: bool = Field(True, description="lr x batch / 512, as in DeiT")
    weight_decay: float = Field(0.05, ge=0)
    latent_weight_decay: float = Field(0.0, ge=0, description="weight decay of the latent binary weights")
    binarizer_lr: float | None = Field(
        None, gt=0, description="own peak lr of the binarizers' scales and thresholds, without weight decay (BiT: "
                                "1e-4; scaled with the batch like lr); null: the stage's lr, in the no-decay group")
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: float | None = Field(5.0, description="gradient clipping; null disables")


class Schedule(Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="used when warmup_steps is 0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class FeatureLoss(Strict):
    """MSE between student and teacher outputs of the modules matching `targets`."""

    targets: list[str] = Field(min_length=1)
    weight: float = Field(1.0, ge=0)

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: list[str]) -> list[str]:
        return [_check_target(t) for t in targets]


class Loss(Strict):
    kd: Literal["soft_ce", "kl"] = "soft_ce"
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    label_weight: float = Field(0.0, ge=0, description="weight of cross-entropy with the labels")
    attention_maps: FeatureLoss | None = None
    attention_of: Literal["binarized", "scores"] = Field(
        "binarized", description="what attention_maps compares: the binarized attention matrices, or the scores "
                                 "q·kᵀ * scale before softmax (BiT's multi-distillation, with features on blocks)")
    features: FeatureLoss | None = None
    weight_regularization: float = Field(
        0.0, ge=0, description="BHViT's mean(| |w| - 1 |) over every latent binary weight, times this (BHViT: 0.1)")


def exactly_one_length(epochs: float | None, steps: int | None) -> None:
    """A training length is given as epochs or as steps, never both."""
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")


class Stage(Strict):
    name: str
    weights: Literal["binary", "fp"] = "binary"
    activations: Literal["binary", "fp"] = "binary"
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    min_steps: int | None = Field(None, gt=0, description="with epochs: at least this many steps, so that an epoch "
                                                          "budget does not collapse on a small dataset")
    init_from: str | None = Field(None, description="name of an earlier stage whose weights start this one")
    teacher: Literal["teacher", "previous_stage"] = Field(
        "teacher", description="previous_stage: BiT-style multi-step distillation")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    loss: Loss = Field(default_factory=Loss)

    @model_validator(mode="after")
    def _length(self) -> "Stage":
        exactly_one_length(self.epochs, self.steps)
        return self


class ModelSection(Strict):
    args: dict[str, Any] = Field(default_factory=dict,
                                 description="timm.create_model arguments, e.g. {img_size: 28, patch_size: 7}")


class DataSection(Strict):
    source: str | None = Field(None, description="the dataset when `didbq binarize` gets no --data: fashion-mnist, "
                                                 "digits, a folder or file, or a Hugging Face hub name")
    batch_size: int = Field(64, gt=0, description="global batch (split across DDP ranks)")
    eval_batch_size: int = Field(256, gt=0)
    workers: int = Field(2, ge=0, description="DataLoader worker processes")
    augment: Literal["none", "light", "timm"] = "light"
    input_size: tuple[int, int, int] | None = Field(None, description="[C, H, W]; default: the model's")
    mean: tuple[float, ...] | None = Field(None, description="default: the model's pretrained_cfg")
    std: tuple[float, ...] | None = None
    train_limit: int | None = Field(None, gt=0, description="use only this many training images")
    test_limit: int | None = Field(None, gt=0)
    seed: int | None = Field(None, description="seed of the train_limit/test_limit subsets and of a split-off test "
                                               "set; default: run.seed (fix it to compare seeds on the same images)")
    image_column: str | None = Field(None, description="of data.source; dropped when --data names another dataset")
    label_column: str | None = Field(None, description="of data.source; dropped when --data names another dataset")


class TeacherSection(Strict):
    pretrained: bool = Field(True, description="timm hub weights when no --teacher-checkpoint is given")
    train: Stage | None = Field(None, description="full-precision fine-tuning of the teacher before distillation")
    min_top1: float = Field(70.0, ge=0, le=100, description="warn when the teacher's test top-1 (%) is below this")

    @field_validator("train")
    @classmethod
    def _label_loss(cls, stage: Stage | None) -> Stage | None:
        if stage is not None and (stage.loss.kd_weight != 0 or stage.loss.label_weight <= 0):
            raise ValueError("the teacher trains on labels: set loss.kd_weight: 0 and loss.label_weight > 0")
        return stage


class RunSection(Strict):
    seed: int = 0
    checkpoint_every: int = Field(200, gt=0, description="steps between checkpoints (and at every stage end)")
    log_every: int = Field(10, gt=0)
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    deterministic: bool = Field(True, description="deterministic algorithms (bit-identical resume on CPU)")
    retain_freed_memory: bool = Field(
        True, description="keep freed memory in the process (glibc malloc): no page faults on every step")
    grad_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="keep only each block's input for backward and recompute the block there (timm's "
                            "gradient checkpointing: much less memory, each block's forward runs twice); auto: for "
                            "inputs of 512x512 pixels or more")


class Recipe(Strict):
    name: str
    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    binarize: Binarize = Field(default_factory=Binarize)
    attention: Attention = Field(default_factory=Attention)
    data: DataSection = Field(default_factory=DataSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    stages: list[Stage] = Field(default_factory=list)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _stage_links(self) -> "Recipe":
        seen: list[str] = []
        for stage in self.stages:
            if stage.init_from is not None and stage.init_from not in seen:
                raise ValueError(f"stage {stage.name!r}: init_from {stage.init_from!r} is not an earlier stage "
                                 f"(earlier: {', '.join(seen) or 'none'})")
            seen.append(stage.name)
        return self

    @property
    def data_seed(self) -> int:
        """The seed that picks the images (data.seed, else run.seed)."""
        return self.run.seed if self.data.seed is None else self.data.seed

    def effective(self) -> dict[str, Any]:
        """The recipe as plain data with every default filled in and the attention preset resolved, so that
        reading it back gives the same recipe (a plain model_dump would turn the preset's choices into the
        didb defaults, which then override any other variant)."""
        data = self.model_dump(mode="json")
        data["attention"] = {"variant": self.attention.variant, **self.attention.resolve().model_dump(mode="json")}
        return data


def line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `path` (or of its deepest existing ancestor)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
            if match is None:
                key_node = next((k for k, _ in node.value if k.value == str(key)), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _model_at(path: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The schema class that holds the key at the end of `path` (for listing the keys it accepts)."""
    model = root
    for key in path[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        candidates += [inner for c in candidates for inner in get_args(c)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _describe(error: dict[str, Any], model: type[BaseModel] | None = None, root: type[BaseModel] | None = None) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        model = model or _model_at(tuple(error["loc"]), root or Recipe)
        return f"unknown key (expected one of: {', '.join(model.model_fields)})" if model else "unknown key"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "missing":
        return "required key is missing"
    given = error.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{message} (got {shown})"


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path, or the name of a built-in recipe (`didb`, `xnor`, ...)."""
    path = Path(recipe)
    if path.exists():
        return path
    builtin = BUILTIN_RECIPES / f"{recipe}.yaml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml")))
    raise RecipeError(f"{recipe}: no such recipe file (built-in recipes: {known})")


def read_yaml(text: str, source: str, error: type[DidbqError] = RecipeError) -> tuple[yaml.Node | None, Any]:
    """The parsed YAML and its node tree (for line numbers); malformed YAML is one line naming the line."""
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as malformed:
        mark = getattr(malformed, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(malformed, "problem", None) or str(malformed).splitlines()[0]
        raise error(f"{source}:{where}: malformed YAML: {problem}") from None


def validated(schema: type[BaseModel], data: Any, source: str, node: yaml.Node | None = None,
              error: type[DidbqError] = RecipeError) -> Any:
    """`schema` validated from `data`; the first problem as one line naming the source, line and key path."""
    try:
        return schema.model_validate(data)
    except ValidationError as invalid:
        first = invalid.errors()[0]
        path = tuple(p for p in first["loc"])
        line = line_of(node, path)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        more = f" (and {invalid.error_count() - 1} more)" if invalid.error_count() > 1 else ""
        return_line = f" line {line}:" if line else ""
        raise error(f"{source}:{return_line} {dotted}: {_describe(first, root=schema)}{more}") from None


def recipe_mapping(text: str, source: str) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The YAML of a recipe as data (and its node tree, for line numbers), not validated yet."""
    node, data = read_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least a 'name' key")
    return node, data


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    node, data = recipe_mapping(text, source)
    return validated(Recipe, data, source, node)


def read_recipe_text(recipe: str | Path) -> tuple[Path, str]:
    """The path and text of a recipe file or built-in recipe name."""
    path = resolve_recipe_path(recipe)
    return path, read_yaml_file(path, "recipe", "recipes/didb.yaml")


def read_yaml_file(path: Path, what: str, example: str, error_type: type[DidbqError] = RecipeError) -> str:
    """The text of a YAML file, or a one-line error: unreadable, or not UTF-8 text (a binary file given by
    mistake)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise error_type(f"{path}: cannot read the {what} ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise error_type(f"{path}: not a text (UTF-8) file: byte {error.start} is "
                         f"{error.object[error.start]:#04x}; a {what} is YAML (see {example})") from None


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A validated Recipe from a file path, a built-in recipe name, a variant of either written
    `name[key=value,...]` (didbq.convert.overrides; PAPER_DIDB is one), or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and "[" in recipe and not Path(recipe).exists():
        from didbq.convert.overrides import recipe_data  # builds on this module's readers

        return validated(Recipe, recipe_data(recipe), recipe)
    path, text = read_recipe_text(recipe)
    return parse_recipe(text, str(path))
