"""Time `didbq.binarize_model(build_model(name), recipe)` for each built-in recipe.

Model creation (timm.create_model through didbq.build_model) and conversion are timed separately; conversion
includes loading and validating the recipe, the full-precision probe pass, building the replacements and cores
and the post-swap check pass, i.e. everything `binarize_model` does. Each recipe is converted `--repeats` times,
each time on a freshly built model, and the median conversion time is reported next to the target of the issue
(deit_small under 2 s on a 2-core CPU).

    python benchmarks/bench_convert.py                       # deit_small_patch16_224, 5 repeats, markdown
    python benchmarks/bench_convert.py --repeats 3 --json
    python benchmarks/bench_convert.py --model deit_tiny_patch16_224 --recipes didb my_recipe.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import didbq  # noqa: F401  (before any timm import: makes timm importable)
from didbq import binarize_model, build_model

BUILTIN_RECIPES = ["didb", "xnor", "bit", "reactnet"]
TARGET_S = 2.0


def git_commit() -> str | None:
    """The checkout's commit, with "+dirty" when didbq/ has uncommitted changes (None outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "didbq"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import timm

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "timm": timm.__version__,
            "didbq": didbq.__version__, "commit": git_commit(), "python": platform.python_version(),
            "threads": torch.get_num_threads(), "loadavg_1m": round(load[0], 2) if load else None}


def time_recipe(model_name: str, recipe: str, repeats: int, seed: int) -> dict:
    create, convert, convert_cpu = [], [], []
    for _ in range(repeats):
        torch.manual_seed(seed)
        start = time.perf_counter()
        model = build_model(model_name)
        built = time.perf_counter()
        cpu_start = time.process_time()
        binarize_model(model, recipe)
        done = time.perf_counter()
        convert_cpu.append(time.process_time() - cpu_start)
        create.append(built - start)
        convert.append(done - built)
        del model
    return {"recipe": recipe, "create_s": create, "convert_s": convert,
            "create_median_s": statistics.median(create), "convert_median_s": statistics.median(convert),
            "convert_min_s": min(convert), "convert_max_s": max(convert), "convert_first_s": convert[0],
            "convert_cpu_s": convert_cpu, "convert_cpu_median_s": statistics.median(convert_cpu),
            "meets_target": statistics.median(convert) < TARGET_S}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Conversion of `{result['model']}`, {result['repeats']} repeats, {m['threads']} threads, "
             f"torch {m['torch']}, {m['cpu']} ({m['nproc']} CPUs), didbq {m['commit']}, {result['date']}",
             "",
             "| recipe | create median (s) | convert median (s) | convert min (s) | convert max (s) "
             f"| first run (s) | CPU time median (s) | < {TARGET_S:g} s |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in result["results"]:
        lines.append(f"| {row['recipe']} | {row['create_median_s']:.3f} | {row['convert_median_s']:.3f} | "
                     f"{row['convert_min_s']:.3f} | {row['convert_max_s']:.3f} | {row['convert_first_s']:.3f} | "
                     f"{row['convert_cpu_median_s']:.3f} | "
                     f"{'yes' if row['meets_target'] else 'no'} |")
    lines += ["", "Times are wall-clock; CPU time is the process's (both threads). The first run is the first "
                  "conversion with that recipe in the process (the very first one also pays one-time start-up)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--repeats", type=int, default=5, help="conversions per recipe (median reported)")
    parser.add_argument("--recipes", nargs="+", default=BUILTIN_RECIPES,
                        help="built-in recipe names or recipe files (default: all built-in recipes)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    torch.set_num_threads(args.threads)
    result = {"benchmark": "convert", "model": args.model, "repeats": args.repeats,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "target_s": TARGET_S, "results": []}
    for recipe in args.recipes:
        result["results"].append(time_recipe(args.model, recipe, args.repeats, args.seed))
        if not args.json:
            row = result["results"][-1]
            print(f"# {recipe}: convert median {row['convert_median_s']:.3f} s", file=sys.stderr, flush=True)
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
