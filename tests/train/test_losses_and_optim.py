"""The lineage's training options (issue 13): BHViT's weight regularisation and BiT's own optimizer group for the
binarizers' scales and thresholds; both off by default, so existing recipes compute what they did."""
from __future__ import annotations

import pytest
import torch

import didbq
from didbq.convert.recipe import Loss, Optimizer
from didbq.convert.walker import convert
from didbq.nn import BinaryLinear
from didbq.nn.binarizers import ActivationBinarizer
from didbq.train.losses import latent_binary_weights, total_loss, weight_regularization
from didbq.train.optim import build_optimizer, parameter_groups


def tiny(recipe: str) -> torch.nn.Module:
    model = didbq.build_model("test_vit", num_classes=10)
    convert(model, recipe)
    return model


def test_weight_regularization_by_hand() -> None:
    weights = [torch.tensor([[0.5, -2.0], [1.0, 0.0]]), torch.tensor([[-1.5]])]
    # | |w| - 1 |: 0.5, 1.0, 0.0, 1.0 and 0.5 -> mean 3.0 / 5
    assert weight_regularization(weights).item() == pytest.approx(0.6)


def test_weight_regularization_joins_the_loss_with_its_weight_and_gradient() -> None:
    model = tiny("xnor")
    latent = latent_binary_weights(model)
    assert len(latent) == sum(isinstance(m, BinaryLinear) for m in model.modules()) > 0
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    off, parts_off = total_loss(Loss(label_weight=1.0, kd_weight=0.0), logits, None, labels, latent_weights=latent)
    on, parts_on = total_loss(Loss(label_weight=1.0, kd_weight=0.0, weight_regularization=0.1), logits, None,
                              labels, latent_weights=latent)
    assert "weight_reg" not in parts_off
    assert on.item() == pytest.approx(off.item() + 0.1 * weight_regularization(latent).item(), rel=1e-6)
    on.backward()
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in latent)


def test_binarizer_lr_makes_its_own_group_without_decay() -> None:
    model = tiny("bit")
    default = parameter_groups(model, Optimizer(), 1e-3)
    assert [group["name"] for group in default] == ["latent", "decay", "no_decay"]
    groups = {group["name"]: group for group in parameter_groups(model, Optimizer(), 1e-3, 1e-4)}
    binarizer_parameters = {id(p) for m in model.modules() if isinstance(m, ActivationBinarizer)
                            for p in m.parameters(recurse=False)}
    assert {id(p) for p in groups["binarizer"]["params"]} == binarizer_parameters
    assert groups["binarizer"]["lr"] == 1e-4 and groups["binarizer"]["weight_decay"] == 0.0
    assert not binarizer_parameters & {id(p) for p in groups["no_decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == sum(len(g["params"]) for g in default)


def test_binarizer_lr_scales_with_the_batch_like_lr() -> None:
    optimizer = build_optimizer(tiny("bit"), Optimizer(lr=1e-3, binarizer_lr=1e-4), global_batch=256)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["binarizer"] == pytest.approx(0.5e-4) and lrs["latent"] == pytest.approx(0.5e-3)


def test_attention_scores_are_tapped_for_bits_multi_distillation() -> None:
    from didbq.convert.recipe import FeatureLoss
    from didbq.train.losses import Taps, tapped_mse

    student, teacher = tiny("xnor"), tiny("xnor[variant=softmax]")
    spec = FeatureLoss(targets=["re:^blocks\\.\\d+\\.attn$"])
    taps = (Taps(student, spec, True, "scores"), Taps(teacher, spec, True, "scores"))
    binarized = Taps(student, spec, True)
    x = torch.randn(2, 3, 160, 160)
    student(x), teacher(x)
    assert sorted(taps[0].outputs) == sorted(taps[1].outputs) == [f"blocks.{i}.attn" for i in range(6)]
    scores, probabilities = taps[0].outputs["blocks.0.attn"], binarized.outputs["blocks.0.attn"]
    assert scores.shape == probabilities.shape and (scores < 0).any() and (probabilities >= 0).all()
    assert torch.isfinite(tapped_mse(*taps))


def test_min_steps_keeps_an_epoch_budget_from_collapsing_on_small_data() -> None:
    from didbq.convert.recipe import Stage
    from didbq.train.runner import stage_steps

    stage = Stage(name="s", epochs=2, min_steps=300)
    assert stage_steps(stage, 20000, 128) == (156, 312)  # the quickstart's own data: the epochs decide
    assert stage_steps(stage, 4000, 128) == (31, 300)  # a small set: at least min_steps
    assert stage_steps(Stage(name="s", epochs=2), 4000, 128) == (31, 62)
    assert stage_steps(Stage(name="s", steps=7, min_steps=300), 4000, 128) == (31, 7)
