#!/usr/bin/env bash
# Issue 13, part 4 on a CUDA GPU: check the CUDA and bf16 paths, run studies/fashion_mnist_grid14_gpu.yaml, and
# print each run's training speed. Needs a venv whose torch is a CUDA build (README, Installing).
#
#   bash studies/run_grid14_gpu.sh [OUT]          # OUT: the study folder (default runs/study_grid14_gpu)
#   STUDY=studies/ci.yaml DEVICE=cpu bash studies/run_grid14_gpu.sh /tmp/ci   # a smoke run of the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study_grid14_gpu}
STUDY=${STUDY:-studies/fashion_mnist_grid14_gpu.yaml}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# 1. One DIDB training step on the device, under bf16 autocast on CUDA: finite loss, every parameter a gradient,
#    and the step time (median of 10 after 3 warm-up steps).
"$PY" - "$DEVICE" <<'PYTHON'
import statistics, sys, time
import torch
import didbq
from didbq.convert.walker import convert

device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: this script is for a GPU machine (DEVICE=cpu runs its smoke test)")
args = {"img_size": 28, "patch_size": 2, "depth": 6, "embed_dim": 192, "num_heads": 3, "in_chans": 1, "num_classes": 10}
model = didbq.build_model("vit_tiny_patch16_224", **args)
convert(model, "didb_lineage")
model.to(device).train()
x, y = torch.randn(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)
times = []
for step in range(13):
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
assert torch.isfinite(loss), loss
missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
assert not missing, f"no gradient: {missing[:3]}"
print(f"{device} {'bf16 autocast' if device.type == 'cuda' else 'fp32'}: loss {loss.item():.3f}, "
      f"step {1e3 * statistics.median(times[3:]):.1f} ms at batch 64 (14x14 grid, dim 192, depth 6)")
PYTHON

# 2. The study (again to continue after a stop).
"$PY" -m didbq study "$STUDY" --out "$OUT" --device "$DEVICE" --no-progress

# 3. Training speed of each run (median images/s over its logged steps).
"$PY" - "$OUT" <<'PYTHON'
import json, statistics, sys
from pathlib import Path
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    speeds = [line["images_per_s"] for line in map(json.loads, metrics.read_text().splitlines())
              if "images_per_s" in line]
    if speeds:
        print(f"{metrics.parent.name}: {statistics.median(speeds):.0f} images/s")
PYTHON
