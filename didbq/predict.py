"""`didbq predict`: class names and probabilities of a trained model for image files, with timm's evaluation
transform built from the model's pretrained_cfg (a loaded run carries the run's preprocessing and labels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn

from didbq.errors import DidbqError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


@dataclass
class Predictions:
    predictions: list[Prediction] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def as_dict(self) -> dict:
        return {"predictions": [{"image": p.image, "top": [{"class": name, "probability": probability}
                                                           for name, probability in p.top]}
                                for p in self.predictions],
                "unreadable": [{"image": image, "reason": reason} for image, reason in self.unreadable]}


def image_files(inputs: Sequence[Path | str]) -> list[Path]:
    """The files given, and the image files (by suffix) anywhere under the folders given, in sorted order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(path for path in item.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def evaluation_transform(model: nn.Module) -> tuple[Callable, dict]:
    """timm's evaluation transform for `model` and the data config it was built from."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    return create_transform(**config, is_training=False), config


def class_names(model: nn.Module) -> list[str]:
    """The run's label names (pretrained_cfg label_names), else the class indices as text."""
    config = getattr(model, "pretrained_cfg", None) or {}
    names = config.get("label_names")
    return list(names) if names else [str(i) for i in range(getattr(model, "num_classes", 0) or 0)]


@torch.no_grad()
def predict(model: nn.Module, inputs: Sequence[Path | str], top_k: int = 5, batch_size: int = 32,
            on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Top-k classes and probabilities of every readable image among `inputs` (files and folders); an image
    that cannot be read is listed in `unreadable` with the reason, not raised. `on_batch(n)` follows progress."""
    if top_k < 1 or batch_size < 1:
        raise DidbqError("--top-k and --batch must be 1 or more")
    transform, config = evaluation_transform(model)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    names = class_names(model)
    result = Predictions()
    files = image_files(inputs)
    model.eval()
    for start in range(0, len(files), batch_size):
        chunk, tensors = [], []
        for path in files[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    tensors.append(transform(image.convert(mode)))
                chunk.append(path)
            except (OSError, ValueError) as error:  # missing, not an image, truncated
                result.unreadable.append((str(path), f"{type(error).__name__}: {str(error).splitlines()[0]}"))
        if tensors:
            logits = model(torch.stack(tensors))
            logits = logits if isinstance(logits, torch.Tensor) else logits[0]
            probabilities, indices = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
            for path, row, index in zip(chunk, probabilities.tolist(), indices.tolist()):
                labels = [names[i] if i < len(names) else str(i) for i in index]
                result.predictions.append(Prediction(str(path), list(zip(labels, row))))
        if on_batch is not None:
            on_batch(len(files[start:start + batch_size]))
    return result
