"""Time packing + writing and loading a packed model, and measure the compression of the written files.

Timing (`--model`, default deit_small_patch16_224, converted once by `--recipe`): `write_packed` (sign packing,
the tensor hash and the safetensors write, atomically) and `didbq.load` (reading and checking the file, building
and converting the timm architecture, unpacking), each repeated `--repeats` times; medians are reported next to the
issue's target (under 2 s each on a 2-core CPU).

Sizes (`--size-models`, default deit_tiny, deit_small and swin_tiny at 224x224 with 1000 classes, for each of
`--size-recipes`): the unconverted model written as fp32 safetensors, the packed file with its full-precision
parts in fp32 and in fp16, and the analytic size of the packed tensors (didbq.report.packed_bytes, the minimum the
format allows: 1 bit per binary weight plus a scale per row); ratios of fp32 over packed and packed over analytic.

    python benchmarks/bench_export.py                       # markdown
    python benchmarks/bench_export.py --repeats 7 --threads 1 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_convert import machine  # same folder: the machine description the other benchmarks print
from safetensors.torch import save_file

import didbq  # noqa: F401  (before any timm import)
from didbq import build_model
from didbq.convert.walker import convert
from didbq.export import load, write_packed
from didbq.report import packed_bytes

TARGET_S = 2.0
SIZE_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def converted(model_name: str, recipe: str) -> tuple[torch.nn.Module, object]:
    model = build_model(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conversion = convert(model, recipe)
    return model.eval(), conversion


def time_export(model_name: str, recipe: str, repeats: int, folder: Path) -> dict:
    model, conversion = converted(model_name, recipe)
    path = folder / "model.safetensors"
    write, read = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        write_packed(model, path, model_name=model_name, model_args={}, recipe=conversion.recipe)
        written = time.perf_counter()
        loaded = load(path)
        read.append(time.perf_counter() - written)
        write.append(written - start)
        del loaded
    example = conversion.example_input
    with torch.no_grad():
        identical = torch.equal(load(path)(example), model(example))
    return {"model": model_name, "recipe": recipe, "write_s": write, "load_s": read,
            "write_median_s": statistics.median(write), "load_median_s": statistics.median(read),
            "file_bytes": path.stat().st_size, "identical_logits": identical,
            "meets_target": statistics.median(write) < TARGET_S and statistics.median(read) < TARGET_S}


def sizes(model_name: str, recipe: str, folder: Path) -> dict:
    reference = build_model(model_name)
    fp32_path = folder / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(fp32_path))
    del reference
    model, conversion = converted(model_name, recipe)
    row = {"model": model_name, "recipe": recipe, "fp32_file_bytes": fp32_path.stat().st_size}
    for dtype, width in (("float32", None), ("float16", 2)):
        path = write_packed(model, folder / f"{dtype}.safetensors", model_name=model_name, model_args={},
                            recipe=conversion.recipe, fp_dtype=dtype)
        row[f"{dtype}_file_bytes"] = path.stat().st_size
        row[f"{dtype}_analytic_bytes"] = packed_bytes(model, width)
        row[f"{dtype}_vs_fp32"] = row["fp32_file_bytes"] / row[f"{dtype}_file_bytes"]
        row[f"{dtype}_vs_analytic"] = row[f"{dtype}_file_bytes"] / row[f"{dtype}_analytic_bytes"]
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"didbq {m['commit']}, torch {m['torch']}, {m['threads']} thread(s), {m['cpu']} ({m['nproc']} CPUs), "
             f"{result['date']}", "",
             f"Pack + write and load, {result['repeats']} repeats (median, min-max):", "",
             f"| model | recipe | pack + write (s) | load (s) | file (MB) | identical logits | < {TARGET_S:g} s |",
             "|---|---|---:|---:|---:|:---:|:---:|"]
    for row in result["timing"]:
        lines.append(f"| {row['model']} | {row['recipe']} | {row['write_median_s']:.3f} "
                     f"({min(row['write_s']):.3f}-{max(row['write_s']):.3f}) | {row['load_median_s']:.3f} "
                     f"({min(row['load_s']):.3f}-{max(row['load_s']):.3f}) | {row['file_bytes'] / 1e6:.3f} | "
                     f"{'yes' if row['identical_logits'] else 'NO'} | {'yes' if row['meets_target'] else 'no'} |")
    lines += ["", "Sizes (224x224, 1000 classes; MB = 10^6 bytes; analytic = the packed tensors, header excluded):",
              "", "| model | recipe | fp32 safetensors (MB) | packed (MB) | vs fp32 | vs analytic | "
                  "packed, fp16 parts (MB) | vs fp32 | vs analytic |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["sizes"]:
        lines.append(f"| {row['model']} | {row['recipe']} | {row['fp32_file_bytes'] / 1e6:.2f} | "
                     f"{row['float32_file_bytes'] / 1e6:.3f} | {row['float32_vs_fp32']:.1f}x | "
                     f"{row['float32_vs_analytic']:.4f} | {row['float16_file_bytes'] / 1e6:.3f} | "
                     f"{row['float16_vs_fp32']:.1f}x | {row['float16_vs_analytic']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model to time")
    parser.add_argument("--recipe", default="xnor", help="recipe for the timed model")
    parser.add_argument("--repeats", type=int, default=5, help="write/load repetitions (median reported)")
    parser.add_argument("--size-models", nargs="*", default=SIZE_MODELS, help="models whose sizes are measured")
    parser.add_argument("--size-recipes", nargs="*", default=["xnor", "didb"], help="recipes for the sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    result = {"benchmark": "export", "repeats": args.repeats, "target_s": TARGET_S, "machine": machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "timing": [], "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        result["timing"].append(time_export(args.model, args.recipe, args.repeats, Path(folder)))
        print(f"# timed {args.model}", file=sys.stderr, flush=True)
        for model_name in args.size_models:
            for recipe in args.size_recipes:
                result["sizes"].append(sizes(model_name, recipe, Path(folder)))
                print(f"# sizes of {model_name} / {recipe}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
