"""Training-step cost of binarized models versus the full-precision model, measured side by side on CPU.

One step is `zero_grad(set_to_none=True)`, forward, cross-entropy with random labels (or the logits' mean) and
`loss.backward()`; no optimizer update. Every model (full precision and one per recipe) is built and converted
up front, put in train mode with everything binary (`set_binarization(model, True, True)`, the state
`binarize_model` leaves), and warmed up (the warm-up step also runs the data-aware initialisation of the BiT
binarizers). The timed steps are interleaved: for each repeat the FP model runs first, then each recipe, so that
noise from the machine hits every model alike. Reported per model: median step time (and forward-only part),
min and max, the ratio of its median over the FP median, the median of the per-repeat ratios, the ratio of the
fastest steps, and the same for process CPU time (robust to other load on the machine). Then one
untimed step per model measures memory: the bytes autograd saves for backward and the peak-RSS growth of the
step; the process peak RSS (getrusage) closes the report.

    python benchmarks/bench_step.py                                   # deit_small, batch 32, 5 timed steps
    python benchmarks/bench_step.py --model deit_tiny_patch16_224 --repeats 3
    python benchmarks/bench_step.py --recipes didb "didb[hfsc=off]" "didb[local=off]" --json
    python benchmarks/bench_step.py --fp-unfused      # also FP with an explicit (materialised) softmax attention

A recipe argument is a built-in name or a YAML file, optionally followed by overrides in brackets, as in
`didbq study` (see didbq/convert/overrides.py): `didb[hfsc=off,local=off]`, `didb[variant=softmax]`,
`didb[linear.shortcut=false]`, `didb[drop_rule=MLP activation]`, `didb[into.MLP activation=rprelu]`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from bench_convert import cpu_model, git_commit  # same folder: one description of the checkout and CPU

import didbq  # noqa: F401  (before any timm import: makes timm importable)
from didbq import binarize_model, build_model, load_recipe
from didbq.nn import BinaryLinear, set_binarization
from didbq.nn.attention import BinaryAttention
from didbq.train.allocator import retain_freed_memory

BUILTIN_RECIPES = ["didb", "xnor", "bit", "reactnet"]
TARGET_RATIO = {"didb": 2.0}  # the target: the DIDB recipe within 2x of full precision


# --------------------------------------------------------------------------------------------- memory

def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _vm_rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the process's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS before a step is a fair baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_pass(model: torch.nn.Module, loss_of) -> dict:
    """One untimed step: bytes autograd saves for backward (parameters excluded) and the peak RSS growth."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    gc.collect()
    _malloc_trim()
    tracked = _reset_hwm()
    resident = _vm_rss_kib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model)
    loss.backward()
    peak = _vm_hwm_kib() if tracked else None
    del loss
    return {"saved_mib": round(sum(saved.values()) / 2**20, 1),
            "rss_growth_mib": round((peak - resident) / 1024, 1) if peak and resident else None,
            "peak_kib": peak}


# --------------------------------------------------------------------------------------------- benchmark

def make_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    models: dict[str, torch.nn.Module] = {}
    torch.manual_seed(args.seed)
    models["fp"] = build_model(args.model).train()
    if args.fp_unfused:
        torch.manual_seed(args.seed)
        unfused = build_model(args.model).train()
        switched = 0
        for module in unfused.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
                switched += 1
        if not switched:
            raise SystemExit(f"--fp-unfused: {args.model} has no attention module with a fused_attn switch")
        models["fp-unfused"] = unfused
    for spec in args.recipes:
        torch.manual_seed(args.seed)
        model = build_model(args.model)
        binarize_model(model, load_recipe(spec))
        set_binarization(model, weights=True, activations=True)
        model.train()
        linears = sum(isinstance(m, BinaryLinear) for m in model.modules())
        cores = sum(isinstance(m, BinaryAttention) for m in model.modules())
        if not linears or not cores:
            raise SystemExit(f"{spec}: conversion produced {linears} binary linears and {cores} attention cores")
        models[spec] = model
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model before timing")
    parser.add_argument("--recipes", nargs="+", default=BUILTIN_RECIPES,
                        help="recipe names, files, or name[key=value,...] ablations (default: all built-in)")
    parser.add_argument("--loss", choices=["ce", "mean"], default="ce",
                        help="cross-entropy with random labels (default) or the mean of the logits")
    parser.add_argument("--fp-unfused", action="store_true",
                        help="add a second FP baseline whose attention materialises the attention matrix "
                             "(fused_attn=False) instead of the fused SDPA kernel")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the extra untimed step per model that measures activation memory")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--system-malloc", dest="retain", action="store_false",
                        help="keep glibc's default malloc settings (by default the benchmark applies "
                             "didbq.train.allocator.retain_freed_memory, as `didbq binarize` does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1, --warmup at least 0")

    retained = args.retain and retain_freed_memory()  # before any thread starts: arenas already made stay
    torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    commit = git_commit()  # at start: the code this process imported
    started = time.perf_counter()
    models = make_models(args)

    from timm.data import resolve_model_data_config

    channels, height, width = resolve_model_data_config(models["fp"])["input_size"]
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, channels, height, width, generator=generator)
    num_classes = models["fp"].num_classes
    labels = torch.randint(0, num_classes, (args.batch,), generator=generator)

    step_s = {name: [] for name in models}
    forward_s = {name: [] for name in models}
    cpu_s = {name: [] for name in models}
    sys_s = {name: [] for name in models}
    faults = {name: [] for name in models}

    def loss_of(model: torch.nn.Module) -> torch.Tensor:
        logits = model(images)
        return F.cross_entropy(logits, labels) if args.loss == "ce" else logits.mean()

    def step(name: str, model: torch.nn.Module) -> tuple[float, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_start = time.process_time()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        forwarded = time.perf_counter()
        loss.backward()
        done = time.perf_counter()
        cpu = time.process_time() - cpu_start
        after = resource.getrusage(resource.RUSAGE_SELF)
        step.last = (after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt)
        if not torch.isfinite(loss):
            raise SystemExit(f"{name}: non-finite loss")
        return done - start, forwarded - start, cpu

    for index in range(args.warmup):
        for name, model in models.items():
            total, _, _ = step(name, model)
            log(f"# warm-up {index + 1}/{args.warmup} {name}: {total:.2f} s")
    for index in range(args.repeats):
        for name, model in models.items():
            total, forward, cpu = step(name, model)
            step_s[name].append(total)
            forward_s[name].append(forward)
            cpu_s[name].append(cpu)
            sys_s[name].append(step.last[0])
            faults[name].append(step.last[1])
            log(f"# step {index + 1}/{args.repeats} {name}: {total:.2f} s (forward {forward:.2f} s, "
                f"CPU time {cpu:.2f} s)")
    # ru_maxrss is the true process peak so far (nothing has reset it yet).
    process_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    memory = {name: {"saved_mib": None, "rss_growth_mib": None} for name in models}
    if args.memory:
        for name, model in models.items():
            memory[name] = memory_pass(model, loss_of)
            log(f"# memory {name}: saved for backward {memory[name]['saved_mib']} MiB, "
                f"RSS growth {memory[name]['rss_growth_mib']} MiB")
            peak = memory[name].pop("peak_kib", None)
            if peak is not None:
                process_peak_kib = max(process_peak_kib, peak)

    fp_median = statistics.median(step_s["fp"])
    fp_cpu_median = statistics.median(cpu_s["fp"])
    rows = []
    for name in models:
        median = statistics.median(step_s[name])
        paired = [s / f for s, f in zip(step_s[name], step_s["fp"])]
        base = name.partition("[")[0]
        target = TARGET_RATIO.get(base) if name == base else None
        label = {"fp": "full precision", "fp-unfused": "full precision, unfused attention"}.get(name, name)
        rows.append({"model": label, "step_s": step_s[name],
                     "forward_s": forward_s[name], "step_median_s": median, "step_min_s": min(step_s[name]),
                     "step_max_s": max(step_s[name]), "forward_median_s": statistics.median(forward_s[name]),
                     "ratio_of_medians": median / fp_median, "median_paired_ratio": statistics.median(paired),
                     "ratio_of_mins": min(step_s[name]) / min(step_s["fp"]),
                     "cpu_s": cpu_s[name], "cpu_median_s": statistics.median(cpu_s[name]),
                     "cpu_ratio_of_medians": statistics.median(cpu_s[name]) / fp_cpu_median,
                     "sys_s": sys_s[name], "sys_median_s": statistics.median(sys_s[name]),
                     "minor_faults": faults[name], "minor_faults_median": statistics.median(faults[name]),
                     "saved_for_backward_mib": memory[name]["saved_mib"],
                     "step_rss_growth_mib": memory[name]["rss_growth_mib"],
                     "target_ratio": target,
                     "meets_target": (median / fp_median <= target) if target is not None else None})
    result = {
        "benchmark": "step", "model": args.model, "batch": args.batch, "input_size": [channels, height, width],
        "repeats": args.repeats, "warmup": args.warmup, "loss": args.loss,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                    "didbq": didbq.__version__, "commit": commit, "threads": torch.get_num_threads(),
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                    "retain_freed_memory": retained,
                    "loadavg_1m_start": round(load_start, 2) if load_start is not None else None,
                    "loadavg_1m_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "wall_s": round(time.perf_counter() - started, 1),
        "process_peak_rss_mib": round(process_peak_kib / 1024, 1),
        "results": rows,
    }
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Training step of `{result['model']}`, batch {result['batch']}, "
             f"{'x'.join(map(str, result['input_size']))}, loss {result['loss']}, {result['repeats']} timed steps "
             f"after {result['warmup']} warm-up, {m['threads']} threads, torch {m['torch']}, {m['cpu']} "
             f"({m['nproc']} CPUs), didbq {m['commit']}, {result['date']}; load average {m['loadavg_1m_start']} -> "
             f"{m['loadavg_1m_end']}; freed memory retained: {'yes' if m.get('retain_freed_memory') else 'no'}" + (f"; {' '.join(f'{k}={v}' for k, v in m['malloc_env'].items())}"
                                            if m.get("malloc_env") else ""),
             "",
             "| model | step median (s) | min (s) | max (s) | forward median (s) | ratio vs FP "
             "| median paired ratio | ratio of mins | CPU time median (s) | CPU-time ratio "
             "| system time median (s) | page faults median | saved for backward (MiB) | RSS growth in step (MiB) "
             "| target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in result["results"]:
        target = "" if row["target_ratio"] is None else (
            f"<= {row['target_ratio']:g}x: {'yes' if row['meets_target'] else 'no'}")
        saved = "" if row["saved_for_backward_mib"] is None else f"{row['saved_for_backward_mib']:.0f}"
        rss = "" if row["step_rss_growth_mib"] is None else f"{row['step_rss_growth_mib']:.0f}"
        lines.append(f"| {row['model']} | {row['step_median_s']:.2f} | {row['step_min_s']:.2f} | "
                     f"{row['step_max_s']:.2f} | {row['forward_median_s']:.2f} | {row['ratio_of_medians']:.2f}x | "
                     f"{row['median_paired_ratio']:.2f}x | {row['ratio_of_mins']:.2f}x | {row['cpu_median_s']:.2f} | "
                     f"{row['cpu_ratio_of_medians']:.2f}x | {row['sys_median_s']:.2f} | "
                     f"{row['minor_faults_median']:,.0f} | {saved} | {rss} | {target} |")
    lines += ["", "Ratios are over the full-precision row: ratio vs FP = median / FP median (the headline number), "
                  "median paired ratio = median over repeats of step / FP step of the same repeat, ratio of mins = "
                  "fastest step / fastest FP step, CPU-time ratio = median process CPU time (all threads) over "
                  "FP's. System time and (minor) page faults per step show the cost of the allocator handing freed memory back "
                  "to the OS and faulting it in again.",
              "", f"Process peak RSS (getrusage; all {len(result['results'])} models resident): "
                  f"{result['process_peak_rss_mib']:.0f} MiB. Saved for backward: bytes of the distinct non-parameter "
                  f"tensors autograd keeps for backward in one step; RSS growth: peak RSS during one extra step "
                  f"minus the RSS before it (after malloc_trim). Wall time {result['wall_s']} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
