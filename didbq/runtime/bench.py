"""`didbq bench`: the fp32 timm model, didbq's float path and the packed runtime timed side by side.

Each round times one forward of every model in turn (alternating, in one process), so a noisy neighbour slows
all three alike; the median, min and max over the rounds and images/s are reported per batch size, with the
parameter bytes each model holds and the largest difference between the packed and the float path's logits.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from didbq.errors import DidbqError

MODELS = ("fp32", "reference", "packed")
LABELS = {"fp32": "timm fp32", "reference": "didbq float path", "packed": "didbq packed"}


def held_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a model holds (each storage counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise DidbqError(f"--threads {threads}: give 1 or more")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _models(target: str, recipe: Any, model_args: dict[str, Any] | None) -> tuple[dict[str, nn.Module], str]:
    """The three models of `target` (a run folder, a packed file or a timm name converted by `recipe`)."""
    from didbq.convert import build_model, load_recipe, plan
    from didbq.export.format import write_packed
    from didbq.export.loader import rebuild
    from didbq.runtime import require_kernels, use_runtime

    require_kernels()
    path = Path(target)
    with tempfile.TemporaryDirectory(prefix="didbq-bench-") as folder:
        if not path.exists():
            if target.endswith(".safetensors") or "/" in target:
                raise DidbqError(f"{target}: no such file or run folder")
            recipe_obj = load_recipe(recipe or "didb")
            arguments = {**recipe_obj.model.args, **(model_args or {})}
            model = build_model(target, pretrained=False, **arguments)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = plan(model, recipe_obj, model_name=target)
            path = write_packed(model.eval(), Path(folder) / "model.safetensors", model_name=target,
                                model_args=arguments, recipe=converted.recipe)
        elif recipe or model_args:
            raise DidbqError("--recipe and --model-arg go with a MODEL name; a run or packed file carries its own")
        reference = rebuild(path)
        packed = use_runtime(rebuild(path).model, "packed")
    metadata = reference.packed.metadata
    fp32 = build_model(metadata["model_name"], pretrained=False, **metadata["model_args"]).eval()
    return {"fp32": fp32, "reference": reference.model, "packed": packed}, metadata["model_name"]


@torch.no_grad()
def _time(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_number in range(warmup + rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(batch)
            if round_number >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def bench(target: str, recipe: Any = None, model_args: dict[str, Any] | None = None, batches: tuple[int, ...] = (1,),
          threads: int | None = None, rounds: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Time `target` (run folder, packed file or timm model name under `recipe`) on the three paths; see the
    module docstring. Returns a JSON-ready dict (what `didbq bench --json` prints)."""
    from didbq.convert.walker import example_input_for
    from didbq.runtime import kernel_name

    if rounds < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise DidbqError("--rounds and --batch must be 1 or more (and --warmup 0 or more)")
    models, model_name = _models(target, recipe, model_args)
    results = []
    with torch_threads(threads):
        for size in batches:
            batch = example_input_for(models["fp32"], size)
            with torch.no_grad():
                difference = (models["packed"](batch) - models["reference"](batch)).abs().max().item()
            seconds = _time(models, batch, rounds, warmup)
            row = {"batch": size, "max_abs_difference": difference}
            for name in MODELS:
                median = statistics.median(seconds[name])
                row[name] = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(seconds[name]),
                             "max_ms": 1e3 * max(seconds[name]), "images_per_s": size / median}
            row["speedup_packed_vs_fp32"] = row["fp32"]["median_ms"] / row["packed"]["median_ms"]
            row["speedup_packed_vs_reference"] = row["reference"]["median_ms"] / row["packed"]["median_ms"]
            results.append(row)
        used_threads = torch.get_num_threads()
    return {"target": target, "model": model_name, "kernel": kernel_name(), "threads": used_threads,
            "rounds": rounds, "held_bytes": {name: held_bytes(models[name]) for name in MODELS}, "results": results}
