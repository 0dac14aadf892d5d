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


RUNS = Path("runs")


def new_run_folder(model_name: str, recipe_name: str, root: Path = RUNS) -> Path:
    """runs/<model>-<recipe>, or the first of -2, -3, ... that does not exist yet or is empty (a run that stopped
    before writing anything): a run is never overwritten."""
    base = root / f"{model_name.replace('/', '_')}-{recipe_name}"
    folder, number = base, 2
    while folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        folder, number = base.with_name(f"{base.name}-{number}"), number + 1
    return folder


def newest_run(root: Path = RUNS) -> Path:
    """The run folder under `root` whose packed model (or, for an unfinished run, run.json) changed last."""
    from didbq.export.loader import MODEL_FILE

    runs = [(folder / MODEL_FILE if (folder / MODEL_FILE).exists() else folder / "run.json", folder)
            for folder in (root.iterdir() if root.is_dir() else []) if (folder / "run.json").exists()]
    if not runs:
        raise DidbqError(f"no run folder under {root}/ (none has a run.json); give a run folder, a packed file or "
                         f"a model name")
    return max(runs, key=lambda pair: pair[0].stat().st_mtime)[1]
