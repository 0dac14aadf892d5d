"""A small hybrid timm model under a recipe with a binary_conv2d rule, for the convolution tests of several
packages (tests/conftest.py puts this folder on sys.path). test_maxvit holds MBConv blocks: 1x1 expansions and
projections, depthwise strided 3x3 convolutions, 1x1 shortcut projections and squeeze-excitation."""
from __future__ import annotations

import json
from typing import Any

import torch

import didbq
from didbq.convert.recipe import Recipe, parse_recipe

MODEL = "test_maxvit"
ARGS = {"img_size": 64, "num_classes": 10}
IGNORE = [{"target": "re:^stem(\\.|$)", "reason": "stem"},
          {"target": "re:(^|\\.)se(\\.|$)", "reason": "squeeze-excitation"}]


def conv_recipe(base: str = "xnor", **options: Any) -> Recipe:
    """`base` with its binary_conv2d rule replaced by one with `options`, the stem and SE kept."""
    data = didbq.load_recipe(base).effective()
    data["binarize"]["rules"] = [rule for rule in data["binarize"]["rules"] if rule["into"] != "binary_conv2d"]
    data["binarize"]["rules"].append({"name": "convolutions", "targets": ["Conv2d"], "into": "binary_conv2d",
                                      "options": options})
    data["binarize"]["ignore"] += IGNORE
    return parse_recipe(json.dumps(data))


def trained(model: torch.nn.Module, steps: int = 2) -> torch.nn.Module:
    """A few AdamW steps on random images, so that thresholds, norms and latent weights move; in eval mode."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, ARGS["img_size"], ARGS["img_size"], generator=generator)
    labels = torch.arange(4) % ARGS["num_classes"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
