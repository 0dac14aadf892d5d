"""Top-1 / top-5 accuracy of a model on a dataset split."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu",
             workers: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        logits = model(images.to(device))
        logits = logits if isinstance(logits, torch.Tensor) else logits[0]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=-1).sum().item()
        total += labels.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "images": total}
