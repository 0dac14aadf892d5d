"""AdamW with the parameter groups binary training needs, and the cosine schedule with warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn

from didbq.convert.recipe import Optimizer, Schedule
from didbq.nn.binarizers import ActivationBinarizer
from didbq.nn.binary import BinaryLayer


def parameter_groups(model: nn.Module, config: Optimizer, lr: float, binarizer_lr: float | None = None
                     ) -> list[dict]:
    """Three groups: latent binary weights (their own decay, usually 0, since decay pulls signs to flip);
    other matrices (decay); and vectors: biases, norms, scales, thresholds, RPReLU, token shifts (no decay).
    With `binarizer_lr`, the scales and thresholds of the activation and attention binarizers form a fourth
    group with that lr and no decay (BiT's)."""
    latent = {id(m.weight) for m in model.modules() if isinstance(m, BinaryLayer)}
    binarizers = {id(p) for m in model.modules() if isinstance(m, ActivationBinarizer)
                  for p in m.parameters(recurse=False)} if binarizer_lr is not None else set()
    groups: dict[str, list[nn.Parameter]] = {"latent": [], "decay": [], "no_decay": [], "binarizer": []}
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in latent:
            groups["latent"].append(parameter)
        elif id(parameter) in binarizers:
            groups["binarizer"].append(parameter)
        elif parameter.ndim >= 2 and parameter.shape[-1] > 1 and parameter.shape[-2] > 1:
            groups["decay"].append(parameter)
        else:
            groups["no_decay"].append(parameter)
    decay = {"latent": config.latent_weight_decay, "decay": config.weight_decay, "no_decay": 0.0, "binarizer": 0.0}
    return [{"params": params, "weight_decay": decay[name], "lr": binarizer_lr if name == "binarizer" else lr,
             "name": name} for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, config: Optimizer, global_batch: int) -> torch.optim.AdamW:
    factor = global_batch / 512 if config.scale_lr_with_batch else 1.0
    binarizer_lr = config.binarizer_lr * factor if config.binarizer_lr is not None else None
    groups = parameter_groups(model, config, config.lr * factor, binarizer_lr)
    return torch.optim.AdamW(groups, lr=config.lr * factor, betas=config.betas)


def build_schedule(optimizer: torch.optim.Optimizer, config: Schedule, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_steps or int(config.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
