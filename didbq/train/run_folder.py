"""Reading a finished (or stopped) run folder back: the recipe, how the model was built, the student."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from didbq.convert.models import build_model
from didbq.convert.recipe import Recipe, load_recipe
from didbq.convert.walker import convert
from didbq.errors import DidbqError
from didbq.nn import set_binarization
from didbq.train.checkpoint import load_weights


def read_run(folder: Path) -> tuple[dict[str, Any], Recipe]:
    """run.json and the effective recipe.yaml of a run folder."""
    run_file, recipe_file = folder / "run.json", folder / "recipe.yaml"
    if not run_file.exists() or not recipe_file.exists():
        raise DidbqError(f"{folder}: not a didbq run folder (run.json and recipe.yaml are missing)")
    return json.loads(run_file.read_text()), load_recipe(recipe_file)


def load_student(folder: Path) -> nn.Module:
    """The trained binary student of a run, in eval mode, binarized as in the recipe's last stage."""
    run, recipe = read_run(folder)
    weights = folder / "student.safetensors"
    if not weights.exists():
        raise DidbqError(f"{folder}: the run has not finished (no student.safetensors); resume it with --resume")
    model = build_model(run["model_name"], pretrained=False, **run["model_args"])
    convert(model, recipe)
    load_weights(weights, model)
    last = recipe.stages[-1]
    set_binarization(model, weights=last.weights == "binary", activations=last.activations == "binary")
    return model.eval()
