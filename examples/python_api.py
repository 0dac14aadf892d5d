"""didbq as a library, without the CLI: build a timm ViT, binarize it, train it with your own loop, write the
packed file, load it back on the packed runtime and classify PNG images.

    HF_HUB_OFFLINE=1 python examples/python_api.py                  # 300 steps on 3,000 images: 10-30 s on 2 cores
    python examples/python_api.py --short                           # 40 steps: a smoke test
    python examples/python_api.py --steps 600 --train-limit 20000   # longer: a better model
    python examples/python_api.py --out my_run                      # keep the packed file and the images

Needs Fashion-MNIST offline (Debian's dataset-fashion-mnist, `make data`). `didbq binarize` does all of this with
a teacher, distillation, checkpoints and resume; this file shows the pieces it is made of.
On a machine busy with other work, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads are many times
slower when they share the cores.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import didbq  # import didbq before timm (it makes the CPU torchvision importable)
from didbq.export import write_packed
from didbq.nn import set_binarization
from didbq.predict import predict
from didbq.train.data import TransformedImages, load_image_data, preprocessing, transform_spec_for

MODEL = "vit_tiny_patch16_224"
# A small ViT for 28x28 greyscale images: 4x4 patches of 7x7 pixels, 2 blocks of width 64.
MODEL_ARGS = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 64, "num_heads": 2, "in_chans": 1,
              "num_classes": 10}


def as_tensors(split: TransformedImages) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split as one image tensor [N, C, H, W] and one label tensor [N]."""
    pairs = [split[i] for i in range(len(split))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(images[i:i + 256]).argmax(-1) for i in range(0, len(images), 256)])
    return (predictions == labels).float().mean().item() * 100


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int,
          lr: float, seed: int) -> float:
    """Plain AdamW on the labels with a cosine schedule; returns the mean loss of the last 10 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # binary nets like clipping
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / len(losses[-10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true",
                        help="a smoke test: 40 steps on 1,000 images (what tests/test_examples.py runs)")
    parser.add_argument("--steps", type=int, default=300, help="training steps, split over two stages")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=3000, help="Fashion-MNIST training images")
    parser.add_argument("--test-limit", type=int, default=500, help="Fashion-MNIST test images")
    parser.add_argument("--images", type=int, default=8, help="test images written as PNG and classified")
    parser.add_argument("--out", type=Path, help="keep the packed file and the PNGs here (default: a temp folder)")
    args = parser.parse_args()
    if args.short:
        args.steps, args.train_limit, args.test_limit, args.images = 40, 1000, 200, 4
    torch.manual_seed(0)
    started = time.perf_counter()

    # 1. Build: timm.create_model with clear errors (no pretrained weights needed).
    model = didbq.build_model(MODEL, **MODEL_ARGS)
    print(f"1. built {MODEL} {MODEL_ARGS}: {sum(p.numel() for p in model.parameters()):,} parameters")

    # 2. Convert in place with the built-in "didb" recipe. didbq.plan does what didbq.binarize_model does and
    #    also accounts for every decision (what `didbq plan --json` prints is plan.as_dict()).
    plan = didbq.plan(model, "didb", model_name=MODEL)
    totals = plan.totals
    print(f"2. converted with recipe {plan.recipe.name!r}: {len(plan.swaps)} modules replaced, "
          f"{totals.binary_parameters:,} 1-bit and {totals.fp_parameters:,} full-precision parameters; "
          f"{totals.compression:.1f}x smaller than fp32, {totals.ops_reduction:.1f}x fewer OPs")

    # 3. Real data: Fashion-MNIST (offline), with the model's own preprocessing (28x28, 1 channel, its mean/std).
    data = load_image_data("fashion-mnist", train_limit=args.train_limit, test_limit=args.test_limit)
    spec = transform_spec_for(model, augment="none")
    train_images, train_labels = as_tensors(TransformedImages(data.train, data, spec, train=False))
    test_images, test_labels = as_tensors(TransformedImages(data.test, data, spec, train=False))
    print(f"3. loaded Fashion-MNIST: {len(train_images)} training and {len(test_images)} test images "
          f"{tuple(train_images.shape[1:])}, classes {', '.join(data.class_names)}")

    # 4. Your own training loop, in two stages as in the paper: binary weights with full-precision activations,
    #    then fully binary (1-bit weights and activations). The first forward in train mode initialises the
    #    data-aware scales of the attention matrices from that batch.
    first = args.steps // 2
    set_binarization(model, weights=True, activations=False)
    loss = train(model, train_images, train_labels, first, args.batch, lr=2e-3, seed=0)
    print(f"4a. trained {first} steps with binary weights, full-precision activations: loss {loss:.3f}, "
          f"test accuracy {accuracy(model, test_images, test_labels):.1f}%")
    set_binarization(model, weights=True, activations=True)
    loss = train(model, train_images, train_labels, args.steps - first, args.batch, lr=1e-3, seed=1)
    float_accuracy = accuracy(model, test_images, test_labels)
    print(f"4b. trained {args.steps - first} steps fully binary: loss {loss:.3f}, "
          f"test accuracy {float_accuracy:.1f}%")

    # 5. Export: 1 bit per binary weight, with the class names and preprocessing, so that didbq.load, timm's
    #    resolve_data_config/create_transform and didbq.predict know how to feed the model.
    out = args.out or Path(tempfile.mkdtemp(prefix="didbq-api-"))
    out.mkdir(parents=True, exist_ok=True)
    path = write_packed(model.eval(), out / "model.safetensors", model_name=MODEL, model_args=MODEL_ARGS,
                        recipe=plan.recipe, extra={"class_names": data.class_names,
                                                   "preprocessing": preprocessing(spec)})
    print(f"5. wrote {path}: {path.stat().st_size / 1e3:.1f} kB (fp32 parameters: {totals.fp32_bytes / 1e3:.1f} kB)")

    # 6. Load it back: a timm model in eval mode on packed weights (XOR-popcount kernels where a C compiler is
    #    available, else the float path).
    loaded = didbq.load(path)
    with torch.no_grad():
        difference = (loaded(test_images[:64]) - model(test_images[:64])).abs().max().item()
    packed_accuracy = accuracy(loaded, test_images, test_labels)
    print(f"6. loaded with didbq.load: test accuracy {packed_accuracy:.1f}% on the packed runtime "
          f"(largest logit difference to the trained model: {difference:.2g})")

    # 7. Predict from image files: timm's evaluation transform from the file's preprocessing, class names.
    pictures = out / "images"
    pictures.mkdir(exist_ok=True)
    truth = {}
    for index in range(min(args.images, len(data.test))):
        row = data.test[index]
        name = pictures / f"{index:03d}-{data.class_names[row['label']].replace('/', '-')}.png"
        Image.fromarray(np.asarray(row["image"], dtype=np.uint8)).save(name)
        truth[str(name)] = data.class_names[row["label"]]
    result = predict(loaded, sorted(truth), top_k=3)      # .as_dict(): what `didbq predict --json` prints
    print(f"7. didbq.predict.predict on {len(truth)} PNG files in {pictures}:")
    right = 0
    for item in result.predictions:                          # item.top: [(class name, probability), ...]
        best = item.top[0][0]
        right += best == truth[item.image]
        top = ", ".join(f"{name} {probability:.2f}" for name, probability in item.top)
        print(f"   {Path(item.image).name}: {top}  ({'right' if best == truth[item.image] else 'wrong'})")
    print(f"accuracy: {packed_accuracy:.1f}% on {len(test_images)} test images, {right}/{len(truth)} PNG files "
          f"right ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
