"""Recipe validation: every built-in recipe loads; every mistake names the file, line and key path."""
from __future__ import annotations

from pathlib import Path

import pytest

from didbq.convert.recipe import BUILTIN_RECIPES, load_recipe, parse_recipe
from didbq.errors import RecipeError
from didbq.nn.attention import ATTENTION_VARIANTS

BUILTINS = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))


def test_builtin_recipes_are_the_documented_four_at_least() -> None:
    assert {"didb", "xnor", "bit", "reactnet"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_recipe_validates_and_names_itself(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.binarize.rules, "a recipe without rules binarizes nothing"
    assert recipe.stages, "stages are declared in every built-in recipe"


def test_recipe_by_path_and_by_name_are_the_same() -> None:
    assert load_recipe(Path("recipes/didb.yaml")) == load_recipe("didb")


def test_didb_recipe_turns_off_what_the_study_measured_worse() -> None:
    options = load_recipe("didb").attention.resolve()
    assert (options.aggregation, options.differential, options.hfsc) == ("plain", False, "off")  # docs/results.md
    assert options.probs == "bit" and options.ensure_one_key
    paper = ATTENTION_VARIANTS["didb"]  # the preset keeps the paper's form
    assert (paper.aggregation, paper.differential, paper.hfsc) == ("diba", True, "separate")
    assert [s.activations for s in load_recipe("didb").stages] == ["binary"]  # one stage measured better than two


def test_attention_overrides_apply_on_top_of_the_variant() -> None:
    recipe = parse_recipe("name: x\nattention: {variant: didb, hfsc: off, local: neighbour_mean}\n")
    resolved = recipe.attention.resolve()
    assert resolved.hfsc == "off" and resolved.local == "neighbour_mean"
    assert resolved.probs == ATTENTION_VARIANTS["didb"].probs


BAD_RECIPES = [
    ("name: [x\n", "r.yaml: line 2: malformed YAML"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("name: x\nbinarize:\n  rulez: []\n", "r.yaml: line 3: binarize.rulez: unknown key (expected one of: rules, ignore)"),
    ("name: x\nattention:\n  variant: didb\n  hfsc: sometimes\n", "line 4: attention.hfsc: Input should be"),
    ("name: x\nstages:\n  - name: a\n    epochs: 1\n    optimizer: {lr: fast}\n", "stages.0.optimizer.lr"),
    ("name: x\nattention: {variant: dibd}\n", "did you mean didb"),
    ("name: x\nbinarize:\n  rules:\n    - {targets: [Linear], into: binary_lin}\n", "did you mean binary_linear"),
    ("name: x\nbinarize:\n  rules:\n    - {targets: [Linear], into: binary_linear, options: {shortcutt: 1}}\n",
     "options.shortcutt: unknown key (expected one of: input_binarizer"),
    ("name: x\nbinarize:\n  rules:\n    - {targets: [Linear], into: binary_linear, options: {input_binarizer: x}}\n",
     "unknown activation binarizer 'x'"),
    ("name: x\nbinarize:\n  rules:\n    - {targets: ['re:('], into: identity}\n", "invalid regular expression"),
    ("name: x\nbinarize:\n  rules:\n    - {targets: ['two words'], into: identity}\n", "neither a module type name"),
    ("name: x\nstages:\n  - {name: b, epochs: 1, init_from: a}\n", "init_from 'a' is not an earlier stage"),
    ("name: x\nstages:\n  - {name: b, epochs: 1, steps: 3}\n", "give exactly one of epochs or steps"),
    ("description: no name\n", "name: required key is missing"),
]


@pytest.mark.parametrize("text, expected", BAD_RECIPES)
def test_bad_recipe_gives_one_line_error_naming_the_problem(text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as error:
        parse_recipe(text, "r.yaml")
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("r.yaml")


def test_missing_recipe_file_lists_the_builtins(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file.*didb"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_recipe_variant_loads_by_name_with_its_overrides() -> None:
    recipe = load_recipe("didb[hfsc=off,linear.shortcut=false,conv.depthwise=binary,into.MLP activation=rprelu]")
    assert recipe.attention.resolve().hfsc == "off"
    linear, conv, activation = recipe.binarize.rules
    assert linear.options["shortcut"] is False and activation.into == "rprelu"
    assert conv.options["depthwise"] == "binary" and conv.options["shortcut"] is True
    assert load_recipe("didb").binarize.rules[2].into == "token_rprelu"  # the built-in file itself is unchanged


def test_run_and_data_keys_and_the_memory_options_override() -> None:
    default = load_recipe("didb")
    assert default.run.grad_checkpointing == "auto" and default.attention.resolve().recompute == "auto"
    recipe = load_recipe("didb[run.grad_checkpointing=true,data.train_limit=64,recompute=false]")
    assert recipe.run.grad_checkpointing is True and recipe.data.train_limit == 64
    assert recipe.attention.resolve().recompute is False
    with pytest.raises(RecipeError, match="grad_checkpointing"):
        load_recipe("didb[run.grad_checkpointing=sometimes]")


def test_stages_override_reshapes_the_schedule_and_keeps_its_length() -> None:
    two = load_recipe("didb[stages=two]").stages
    one = load_recipe("didb[stages=one]").stages
    assert [(s.name, s.weights, s.activations, s.init_from) for s in two] == [
        ("binary-weights", "binary", "fp", None), ("fully-binary", "binary", "binary", "binary-weights")]
    assert [(s.name, s.activations) for s in one] == [("fully-binary", "binary")]
    assert sum(s.epochs for s in two) == sum(s.epochs for s in one) == sum(s.epochs for s in load_recipe("didb").stages)
    assert two[0].optimizer == one[0].optimizer == load_recipe("didb").stages[-1].optimizer


@pytest.mark.parametrize("spec, expected", [
    ("didb[stages=three]", "stages=three is not one of one, two"),
    ("didb[hfsc=sometimes]", "didb[hfsc=sometimes]: attention.hfsc: Input should be"),
    ("didb[hfsc]", "override 'hfsc' is not key=value"),
    ("didb[hfsc=off", "overrides must end with ']'"),
    ("didb[into.nothing=rprelu]", "no rule named 'nothing'"),
])
def test_a_bad_recipe_variant_gives_one_line_error(spec: str, expected: str) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(spec)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_stages_reshape_in_steps_too_but_not_in_mixed_units(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text("name: mixed\nstages:\n  - {name: a, epochs: 1}\n  - {name: b, steps: 10, init_from: a}\n")
    with pytest.raises(RecipeError, match="every stage its length in epochs, or every one in steps"):
        load_recipe(f"{path}[stages=one]")
    path.write_text("name: steps\nstages:\n  - {name: a, steps: 9}\n  - {name: b, steps: 10, init_from: a}\n")
    assert [s.steps for s in load_recipe(f"{path}[stages=two]").stages] == [9, 9]


def test_the_lineage_recipe_has_the_papers_parts_and_each_lineage_part_switches_off_alone() -> None:
    lineage = load_recipe("didb_lineage")
    attention = lineage.attention.resolve()
    assert (attention.aggregation, attention.differential, attention.hfsc) == ("diba", True, "separate")
    assert attention.context_shortcut and attention.context_act == "rprelu" and attention.output_norm
    assert [(s.activations, s.loss.weight_regularization, s.optimizer.weight_decay) for s in lineage.stages] == [
        ("fp", 0.1, 0.0), ("binary", 0.1, 0.0)]
    assert lineage.binarize.rules[0].options["norm"] == "batchnorm"
    assert load_recipe("didb_lineage[linear.norm=layernorm]").binarize.rules[0].options["norm"] == "layernorm"
    names = [rule.name for rule in load_recipe("didb_lineage[drop_rule=layer scale]").binarize.rules]
    assert "layer scale" not in names and "block norms" in names
    off = load_recipe("didb_lineage[loss.weight_regularization=0,optimizer.binarizer_lr=1e-4]")
    assert all(s.loss.weight_regularization == 0 and s.optimizer.binarizer_lr == 1e-4 for s in off.stages)
    assert all(s.loss.kd_weight == 1.0 for s in off.stages)  # the other keys of each stage stay


def test_new_options_are_off_in_the_existing_recipes() -> None:
    for name in ("didb", "xnor", "bit", "reactnet", "quick"):
        recipe = load_recipe(name)
        attention = recipe.attention.resolve()
        assert not attention.context_shortcut and attention.context_act == "none"
        assert all(s.loss.weight_regularization == 0 and s.optimizer.binarizer_lr is None
                   and s.loss.attention_of == "binarized" for s in recipe.stages)
        # binary_conv2d: a plain ViT's only convolution is its patch embedding, which every recipe ignores
        assert {rule.into for rule in recipe.binarize.rules} <= {"binary_linear", "binary_conv2d", "rprelu",
                                                                 "token_rprelu", "identity"}


def test_a_stage_key_override_needs_stages(tmp_path: Path) -> None:
    path = tmp_path / "bare.yaml"
    path.write_text("name: bare\nbinarize: {rules: [{targets: [Linear], into: binary_linear}]}\n")
    with pytest.raises(RecipeError, match="declares no stages"):
        load_recipe(f"{path}[loss.weight_regularization=0.1]")
