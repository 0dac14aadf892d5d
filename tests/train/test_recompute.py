"""Gradient checkpointing of converted models (run.grad_checkpointing): when it turns on, and that a converted
binary ViT rerun block by block in backward gives the gradients it gives without, keeping far less."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import didbq
from didbq.convert import convert, load_recipe
from didbq.train.recompute import AUTO_PIXELS, enable_grad_checkpointing, wants_grad_checkpointing


@pytest.mark.parametrize("setting, size, expected", [
    ("auto", (3, 224, 224), False), ("auto", (3, 512, 384), False), ("auto", (3, 512, 512), True), ("auto", (3, 1024, 768), True),
    (True, (3, 28, 28), True), (False, (3, 1024, 1024), False)])
def test_when_checkpointing_is_wanted(setting: bool | str, size: tuple[int, int, int], expected: bool) -> None:
    assert wants_grad_checkpointing(setting, size) is expected
    assert AUTO_PIXELS == 512 * 512


def test_models_without_timm_checkpointing_are_left_as_they_are() -> None:
    assert not enable_grad_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    crossvit = timm.create_model("crossvit_tiny_240", pretrained=False)  # timm asserts: not supported
    assert not enable_grad_checkpointing(crossvit)


def _step(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training step of a converted (DIDB, fully binary) test_vit: loss, gradients and bytes kept for
    backward."""
    torch.manual_seed(0)
    model = didbq.build_model("test_vit")
    convert(model, load_recipe("didb[aggregation=diba,hfsc=separate]"))
    assert enable_grad_checkpointing(model) if checkpointing else True
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        model(images)  # calibration: data-aware scales before the step, as the runner does
    saved: list[int] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(images).logsumexp(-1).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


def test_a_checkpointed_binary_model_has_the_same_gradients_and_keeps_less() -> None:
    loss, grads, saved = _step(False)
    loss_c, grads_c, saved_c = _step(True)
    assert loss_c == loss
    assert grads_c.keys() == grads.keys() and len(grads) > 50
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert saved_c < saved / 5
