"""The packed runtime against torch fp32: binary linear layers at DeiT-S shapes, whole models, memory, and
where a packed forward spends its time. Run by hand (see benchmarks/README.md); results in docs/results.md.

    .venv/bin/python benchmarks/bench_runtime.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_convert import cpu_model, git_commit  # noqa: E402

from didbq.export.packing import pack_signs  # noqa: E402
from didbq.runtime import kernels  # noqa: E402
from didbq.runtime import ops as runtime_ops  # noqa: E402
from didbq.runtime.bench import bench, torch_threads  # noqa: E402
from didbq.runtime.build import ISAS  # noqa: E402

DEIT_LAYERS = [("qkv", 384, 1152), ("fc1", 384, 1536), ("fc2", 1536, 384), ("proj", 384, 384)]
QUICK = ("vit_tiny_patch16_224", "quick", {"img_size": 28, "patch_size": 7, "depth": 6, "embed_dim": 192,
                                           "num_heads": 3, "in_chans": 1, "num_classes": 10})
MODELS = [("deit_small_patch16_224", "xnor", {}), ("deit_small_patch16_224", "didb", {}), QUICK]


def median_ms(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layer_row(name: str, columns: int, outputs: int, tokens: int, paths: tuple[str, ...], rounds: int) -> dict:
    """One layer shape: fp32 F.linear and the binary kernel (input binarization and packing included) on every
    code path, alternating per round; the median of each and the speed-ups."""
    x, weight = torch.randn(tokens, columns), torch.randn(outputs, columns)
    shift, alpha, bias = torch.randn(columns) * 0.1, torch.rand(outputs), torch.randn(outputs)
    panels = runtime_ops.weight_panels(pack_signs(weight >= 0), columns)
    calls = {"fp32": lambda: F.linear(x, weight, bias)}
    for path in paths:
        calls[path] = (lambda p=path: runtime_ops._binary_linear(x, shift, panels, alpha, bias, outputs, p))
    timings: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for key, call in calls.items():
            timings[key].append(median_ms(call, 5))
    row = {"layer": name, "K": columns, "N": outputs, "M": tokens, "threads": torch.get_num_threads()}
    row.update({f"{key}_ms": statistics.median(timings[key]) for key in calls})
    row.update({f"{path}_speedup": row["fp32_ms"] / row[f"{path}_ms"] for path in paths})
    return row


def layer_rows(tokens: int, threads: int, rounds: int) -> list[dict]:
    """DeiT-S's four layer shapes and a long-K ceiling, at `threads` threads."""
    paths = ISAS[: ISAS.index(kernels().best) + 1][::-1]
    with torch_threads(threads):
        return [layer_row(name, columns, outputs, tokens, paths, rounds)
                for name, columns, outputs in [*DEIT_LAYERS, ("ceiling (K = 8192)", 8192, 1536)]]


def breakdown(model_name: str, recipe: str, args: dict, rounds: int) -> dict:
    """Milliseconds per packed forward (batch 1, 1 thread) in the linear kernel, the attention kernel and the rest."""
    from didbq.convert import build_model, plan
    from didbq.convert.walker import example_input_for
    from didbq.export.format import write_packed
    from didbq.export.loader import load

    model = build_model(model_name, **args)
    converted = plan(model, recipe, model_name=model_name)
    with tempfile.TemporaryDirectory() as folder:
        path = write_packed(model.eval(), Path(folder) / "m.safetensors", model_name=model_name, model_args=args,
                            recipe=converted.recipe)
        packed = load(path, runtime="packed")
    spent: collections.Counter = collections.Counter()
    originals = dict(runtime_ops._IMPLEMENTATIONS)

    def timed(key: str):  # noqa: ANN202
        def call(*arguments):  # noqa: ANN002, ANN202
            start = time.perf_counter()
            result = originals[key](*arguments)
            spent[key] += time.perf_counter() - start
            return result
        return call

    batch = example_input_for(packed, 1)
    with torch_threads(1), torch.no_grad():
        packed(batch)
        runtime_ops._IMPLEMENTATIONS.update({key: timed(key) for key in originals})
        try:
            total = median_ms(lambda: packed(batch), rounds)
        finally:
            runtime_ops._IMPLEMENTATIONS.update(originals)
    parts = {key: 1e3 * value / rounds for key, value in spent.items()}
    return {"model": model_name, "recipe": recipe, "total_ms": total, **{f"{k}_ms": v for k, v in parts.items()},
            "other_ms": total - sum(parts.values())}


PEAK_SCRIPT = """
import sys, json, torch, didbq
from didbq.convert import build_model
from didbq.convert.walker import example_input_for
from didbq.runtime import kernels
name, args, runtime, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
kernels()
def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
model = build_model(name, **args).eval() if runtime == "fp32" else didbq.load(path, runtime=runtime)
held = rss("VmRSS:")
with torch.no_grad():
    model(example_input_for(model, 1))
print(held - before, rss("VmHWM:") - before)
"""


def peak_rss(model_name: str, recipe: str, args: dict) -> dict:
    """Per runtime, in a fresh process with torch and didbq imported: how much the resident memory grows to hold
    the loaded model (MiB) and its peak growth while loading it and running one forward."""
    from didbq.convert import build_model, plan
    from didbq.export.format import write_packed

    model = build_model(model_name, **args)
    converted = plan(model, recipe, model_name=model_name)
    result = {"model": model_name, "recipe": recipe}
    with tempfile.TemporaryDirectory() as folder:
        path = write_packed(model.eval(), Path(folder) / "m.safetensors", model_name=model_name, model_args=args,
                            recipe=converted.recipe)
        for runtime in ("fp32", "reference", "packed"):
            done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, model_name, json.dumps(args), runtime,
                                   str(path)], capture_output=True, text=True, check=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            held, peak = (int(value) / 1024 for value in done.stdout.split()[-2:])
            result[f"{runtime}_held_mib"], result[f"{runtime}_peak_mib"] = held, peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only (a smoke run)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    rounds = 2 if options.quick else options.rounds
    started = time.time()
    report = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "kernel": kernels().best, "openmp": kernels().openmp, "commit": git_commit(),
                          "load_average": os.getloadavg()}}
    report["layers"] = [row for threads in (1, 2) for row in layer_rows(197, threads, rounds)]
    report["models"] = []
    for name, recipe, args in MODELS:
        for threads in (1, 2):
            result = bench(name, recipe, args, batches=(1,) if options.quick else (1, 32), threads=threads,
                           rounds=rounds)
            for row in result["results"]:
                report["models"].append({"model": name, "recipe": recipe, "threads": threads, **row,
                                         "held_bytes": result["held_bytes"]})
    report["breakdown"] = [breakdown(name, recipe, args, max(rounds, 5)) for name, recipe, args in MODELS]
    report["memory"] = [peak_rss(name, recipe, args) for name, recipe, args in MODELS]
    report["seconds"] = time.time() - started
    report["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if options.json:
        print(json.dumps(report, indent=2))
        return
    print(markdown(report))


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, kernel {machine['kernel']}, "
             f"commit {machine['commit']}, load {machine['load_average'][0]:.2f}", "",
             "| layer (K -> N), 197 tokens | threads | fp32 ms | " + " | ".join(
                 f"{p} ms (x)" for p in ISAS[::-1] if f"{p}_ms" in report["layers"][0]) + " |",
             "|---|---:|---:|" + "---:|" * sum(f"{p}_ms" in report["layers"][0] for p in ISAS)]
    for row in report["layers"]:
        cells = [f"{row[f'{p}_ms']:.3f} ({row[f'{p}_speedup']:.1f}x)" for p in ISAS[::-1] if f"{p}_ms" in row]
        lines.append(f"| {row['layer']} ({row['K']} -> {row['N']}) | {row['threads']} | {row['fp32_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| model | recipe | threads | batch | fp32 ms | float path ms | packed ms | packed vs fp32 | "
                  "max abs diff | held MiB fp32 / float / packed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["models"]:
        held = " / ".join(f"{row['held_bytes'][k] / 2**20:.1f}" for k in ("fp32", "reference", "packed"))
        lines.append(f"| {row['model']} | {row['recipe']} | {row['threads']} | {row['batch']} | "
                     f"{row['fp32']['median_ms']:.1f} | {row['reference']['median_ms']:.1f} | "
                     f"{row['packed']['median_ms']:.1f} | {row['speedup_packed_vs_fp32']:.2f}x | "
                     f"{row['max_abs_difference']:.2g} | {held} |")
    lines += ["", "| packed forward, batch 1, 1 thread | total ms | linear kernel ms | attention kernel ms | rest ms |",
              "|---|---:|---:|---:|---:|"]
    for row in report["breakdown"]:
        lines.append(f"| {row['model']} {row['recipe']} | {row['total_ms']:.1f} | {row.get('binary_linear_ms', 0):.1f}"
                     f" | {row.get('binary_attention_ms', 0):.1f} | {row['other_ms']:.1f} |")
    lines += ["", "| RSS growth (MiB): held after load / peak of load + one forward | fp32 | float path | packed |",
              "|---|---:|---:|---:|"]
    for row in report["memory"]:
        lines.append(f"| {row['model']} {row['recipe']} | " + " | ".join(
            f"{row[f'{k}_held_mib']:.0f} / {row[f'{k}_peak_mib']:.0f}" for k in ("fp32", "reference", "packed")) + " |")
    lines.append(f"\n{report['seconds']:.0f} s in all")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
