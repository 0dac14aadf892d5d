"""How far each student of a study starts from its teacher: test top-1 before any training step.

A short distillation budget favours recipes whose converted model starts close to the teacher's function
(method.md section 8). This measures that start for every student of a study, from the study's own teacher:
  - binary weights: weights binarized, activations full precision (where a two-stage recipe starts);
  - fully binary: weights and activations binarized, after the data-aware calibration on the first training
    batch (where a one-stage recipe starts).
No training happens here, so the numbers separate what a recipe's structure costs at conversion from what its
training recovers. Runs with several seeds are measured once (the start does not depend on the run's seed).

    python benchmarks/bench_start.py studies/fashion_mnist.yaml --out runs/study_fmnist [--test-limit 2000]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import didbq  # noqa: F401  (torchvision compatibility before timm)
from didbq.convert.models import build_model
from didbq.convert.walker import convert
from didbq.nn import set_binarization
from didbq.study import StudyRun, load_study
from didbq.train.checkpoint import load_weights
from didbq.train.evaluate import evaluate
from didbq.train.runner import calibrate, datasets_for, load_data


def start_accuracies(study_file: Path, out: Path, test_limit: int | None) -> dict[str, object]:
    plan = load_study(study_file)
    first_runs: dict[str, StudyRun] = {}  # each student's first seed
    for run in plan.students:
        first_runs.setdefault(run.student.name, run)
    any_recipe = plan.students[0].recipe
    if test_limit is not None:
        any_recipe = any_recipe.model_copy(update={"data": any_recipe.data.model_copy(update={"test_limit": test_limit})})
    data = load_data(plan.study.data.source, any_recipe)
    teacher = build_model(plan.study.model.name, pretrained=False, **plan.study.model.args,
                          num_classes=data.num_classes)
    load_weights(plan.teacher_file(out), teacher)
    train_set, test_set = datasets_for(data, teacher, any_recipe)
    batch = any_recipe.data.eval_batch_size
    rows = [{"student": "teacher", "binary_weights": evaluate(teacher, test_set, batch)["top1"]}]
    for name, run in first_runs.items():
        student = copy.deepcopy(teacher)
        convert(student, run.recipe, example_input=None)
        set_binarization(student, weights=True, activations=False)
        binary_weights = evaluate(student, test_set, batch)["top1"]
        set_binarization(student, weights=True, activations=True)
        calibrate(student, train_set, run.recipe.data.batch_size, run.recipe.run.seed)
        row = {"student": name, "recipe": run.student.recipe, "binary_weights": binary_weights,
               "fully_binary": evaluate(student, test_set, batch)["top1"]}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return {"study": plan.study.name, "teacher_file": str(plan.teacher_file(out)), "test_images": len(test_set),
            "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the study's output folder (its teacher is used)")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on this many test images")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    result = start_accuracies(args.study, args.out, args.test_limit)
    print("| student | top-1 at start, binary weights | top-1 at start, fully binary |\n|---|---:|---:|")
    for row in result["rows"]:
        fully = f"{row['fully_binary']:.2f}" if "fully_binary" in row else "–"
        print(f"| {row['student']} | {row['binary_weights']:.2f} | {fully} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
