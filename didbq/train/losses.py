"""Distillation losses: soft cross-entropy or KL to the teacher, label cross-entropy, and MSE on features or
attention maps of modules addressed by recipe targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from didbq.convert.matching import first_match
from didbq.convert.recipe import FeatureLoss, Loss
from didbq.nn.attention import BinaryAttention
from didbq.nn.binary import BinaryLayer


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """ReActNet's distribution loss: cross-entropy of the student to the teacher's softened distribution."""
    targets = F.softmax(teacher / temperature, dim=-1)
    return -(targets * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean() * temperature ** 2


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


KD_LOSSES = {"soft_ce": soft_cross_entropy, "kl": kl_divergence}


class Taps:
    """Forward hooks that keep the outputs of the modules matching a FeatureLoss's targets.

    For attention maps the tapped module is each attention core's probability binarizer, whose output is the
    (binarized) attention matrix, or with `attention_of="scores"` its score tap (q·kᵀ * scale before softmax);
    the teacher's attention is routed through full-precision cores for this.
    """

    def __init__(self, model: nn.Module, spec: FeatureLoss, attention_maps: bool,
                 attention_of: str = "binarized") -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if attention_maps:
                core = getattr(module, "binary_core", None)
                if isinstance(core, BinaryAttention) and first_match(spec.targets, name, module):
                    self._tap(name, core.score_tap if attention_of == "scores" else core.prob_binarizer)
            elif name and first_match(spec.targets, name, module):
                self._tap(name, module)

    def _tap(self, name: str, module: nn.Module) -> None:
        def keep(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output if isinstance(output, torch.Tensor) else output[0]

        self.handles.append(module.register_forward_hook(keep))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def tapped_mse(student: Taps, teacher: Taps) -> torch.Tensor:
    names = sorted(set(student.outputs) & set(teacher.outputs))
    if not names:
        raise RuntimeError("no tapped module produced an output in both student and teacher")
    return sum(F.mse_loss(student.outputs[n].float(), teacher.outputs[n].float()) for n in names) / len(names)


def weight_regularization(latent_weights: list[torch.Tensor]) -> torch.Tensor:
    """BHViT's mean(| |w| - 1 |) over every element of the latent binary weights: it keeps weights away from 0,
    where Adam makes their signs oscillate."""
    total = sum((weight.abs() - 1).abs().sum() for weight in latent_weights)
    return total / sum(weight.numel() for weight in latent_weights)


def latent_binary_weights(model: nn.Module) -> list[torch.Tensor]:
    """The latent weights of the BinaryLinear and BinaryConv2d layers whose weights are binarized in forward."""
    return [m.weight for m in model.modules()
            if isinstance(m, BinaryLayer) and m.binarize_weights and not m.weight_is_binary]


def total_loss(loss: Loss, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               labels: torch.Tensor, feature_taps: tuple[Taps, Taps] | None = None,
               attention_taps: tuple[Taps, Taps] | None = None, latent_weights: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the recipe's losses, and each part for the metrics file."""
    parts: dict[str, torch.Tensor] = {}
    if loss.kd_weight and teacher_logits is not None:
        parts["kd"] = loss.kd_weight * KD_LOSSES[loss.kd](student_logits, teacher_logits, loss.temperature)
    if loss.label_weight:
        parts["label"] = loss.label_weight * F.cross_entropy(student_logits, labels)
    if feature_taps is not None and loss.features is not None:
        parts["features"] = loss.features.weight * tapped_mse(*feature_taps)
    if attention_taps is not None and loss.attention_maps is not None:
        parts["attention"] = loss.attention_maps.weight * tapped_mse(*attention_taps)
    if loss.weight_regularization and latent_weights:
        parts["weight_reg"] = loss.weight_regularization * weight_regularization(latent_weights)
    total = sum(parts.values())
    return total, {name: float(value.detach()) for name, value in parts.items()}
