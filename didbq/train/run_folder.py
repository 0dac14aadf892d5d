"""Reading a finished (or stopped) run folder back: the recipe, how the model was built, the student."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from didbq.convert.recipe import Recipe, load_recipe
from didbq.errors import DidbqError


def read_run(folder: Path) -> tuple[dict[str, Any], Recipe]:
    """run.json and the effective recipe.yaml of a run folder."""
    run_file, recipe_file = folder / "run.json", folder / "recipe.yaml"
    if not run_file.exists() or not recipe_file.exists():
        raise DidbqError(f"{folder}: not a didbq run folder (run.json and recipe.yaml are missing)")
    return json.loads(run_file.read_text()), load_recipe(recipe_file)


def load_student(folder: Path, runtime: str = "auto") -> nn.Module:
    """The trained binary student of a run, in eval mode, as its packed model.safetensors holds it (binarized as
    in the recipe's last stage; bit-identical to the model the run ended with), on `runtime` (didbq.load)."""
    from didbq.export.loader import load

    return load(folder, runtime)
