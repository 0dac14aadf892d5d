"""Distillation loop overhead and peak memory (issue: "didbq binarize" performance).

1. overhead: images/s of the real training loop (`didbq binarize`, one distillation stage, DataLoader included)
   against a bare loop on in-memory tensors doing the same work: teacher forward without gradients, student
   forward and backward, AdamW step. Same model, recipe, batch and thread count, run in this one process.
2. memory: peak resident memory of one distillation step (teacher forward + student forward/backward + AdamW)
   for a model at a batch size, measured in a fresh subprocess (ru_maxrss).

Both apply `retain_freed_memory` first, as `didbq binarize` does, so that the loops differ only in the loop.
The overhead rounds alternate bare and real loops so that load on the machine hits both alike.

    python benchmarks/bench_loop.py overhead [--steps 40] [--rounds 3] [--threads 2]
    python benchmarks/bench_loop.py memory --model deit_small_patch16_224 --batch 32 [--recipe didb]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import didbq
from didbq.nn import set_binarization
from didbq.train.allocator import retain_freed_memory
from didbq.train.checkpoint import save_weights
from didbq.train.distributed import setup
from didbq.train.losses import soft_cross_entropy
from didbq.train.runner import BinarizeConfig, binarize

QUICK_ARGS = {"img_size": 28, "patch_size": 7, "depth": 6, "embed_dim": 192, "num_heads": 3, "in_chans": 1,
              "num_classes": 10}


def bare_images_per_second(recipe: didbq.convert.Recipe, steps: int, batch: int) -> float:
    teacher = didbq.build_model("vit_tiny_patch16_224", **QUICK_ARGS).eval().requires_grad_(False)
    student = didbq.binarize_model(didbq.build_model("vit_tiny_patch16_224", **QUICK_ARGS), recipe).train()
    set_binarization(student, weights=True, activations=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, 28, 28)
    for _ in range(3):  # warm-up, and the data-aware initialisation
        student(images)
    started = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():
            target = teacher(images)
        loss = soft_cross_entropy(student(images), target, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def loop_images_per_second(recipe_text: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        teacher = didbq.build_model("vit_tiny_patch16_224", **QUICK_ARGS)
        save_weights(folder / "teacher.safetensors", teacher)
        (folder / "recipe.yaml").write_text(recipe_text)
        recipe = didbq.load_recipe(folder / "recipe.yaml")
        config = BinarizeConfig("vit_tiny_patch16_224", "fashion-mnist", folder / "run", folder / "teacher.safetensors",
                                progress=False)
        binarize(config, recipe, setup("cpu"), log=lambda message: None)
        records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]  # the first window has warm-up
        return statistics.median(rates)


def overhead(steps: int, rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as `didbq binarize` does
    retain_freed_memory()
    quick = (Path(__file__).resolve().parent.parent / "recipes" / "quick.yaml").read_text()
    stage = f"""
stages:
  - {{name: distill, steps: {steps}, optimizer: {{lr: 1.0e-4, scale_lr_with_batch: false, clip_grad_norm: null}}}}
run: {{log_every: 5, checkpoint_every: 100000}}
teacher: {{pretrained: false}}
"""
    recipe_text = quick.split("\nteacher:")[0] + "\n" + stage
    recipe = didbq.convert.parse_recipe(recipe_text)
    bare, loop = [], []
    for _ in range(rounds):
        bare.append(bare_images_per_second(recipe, steps, recipe.data.batch_size))
        loop.append(loop_images_per_second(recipe_text, steps))
        print(f"# bare {bare[-1]:.0f} img/s, loop {loop[-1]:.0f} img/s", file=sys.stderr, flush=True)
    bare_median, loop_median = statistics.median(bare), statistics.median(loop)
    return {"threads": threads, "steps": steps, "batch": recipe.data.batch_size, "bare_images_per_s": bare,
            "loop_images_per_s": loop, "bare_median": bare_median, "loop_median": loop_median,
            "overhead": bare_median / loop_median - 1}


def memory(model: str, batch: int, recipe: str, threads: int) -> dict:
    code = f"""
import resource, torch, didbq
from didbq.train.allocator import retain_freed_memory
from didbq.train.losses import soft_cross_entropy
torch.set_num_threads({threads}); torch.set_flush_denormal(True); retain_freed_memory()
teacher = didbq.build_model({model!r}).eval().requires_grad_(False)
student = didbq.binarize_model(didbq.build_model({model!r}), {recipe!r}).train()
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
images = torch.randn({batch}, 3, 224, 224)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    with torch.no_grad():
        target = teacher(images)
    loss = soft_cross_entropy(student(images), target, 1.0)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak = (int(v) / 2**20 for v in output[-2:])
    return {"model": model, "batch": batch, "recipe": recipe, "threads": threads, "peak_rss_gib": peak,
            "after_setup_gib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "memory"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--recipe", default="didb")
    parser.add_argument("--rounds", type=int, default=3, help="overhead: alternating bare/real rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = (overhead(args.steps, args.rounds, args.threads) if args.what == "overhead"
              else memory(args.model, args.batch, args.recipe, args.threads))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
