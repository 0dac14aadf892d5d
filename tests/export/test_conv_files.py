"""Packed files with binary convolutions (format version 2): a hybrid timm model comes back with bit-identical
logits on both runtimes, its convolutions stored as sign bits only; files of format version 1 still load."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from badfiles import rewrite
from convmodels import ARGS, MODEL, conv_recipe, trained
from safetensors.torch import load_file

import didbq
from didbq.convert.walker import convert
from didbq.export import load, read_packed, write_packed
from didbq.export.format import FORMAT_VERSION, tensors_hash, write_float
from didbq.nn import BinaryConv2d


@pytest.fixture(scope="module")
def model_and_recipe() -> tuple[torch.nn.Module, object]:
    """test_maxvit with every convolution but the stem and SE binary (depthwise ones included: groups, stride 2),
    BatchNorm2d and RPReLU after each, thresholds started at the first batch's mean, trained two steps."""
    torch.manual_seed(0)
    model = didbq.build_model(MODEL, **ARGS)
    conversion = convert(model, conv_recipe(norm="batchnorm", act="rprelu", depthwise="binary",
                                            threshold_init="mean"))
    return trained(model), conversion.recipe


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _write(model: torch.nn.Module, recipe: object, path: Path, **options: object) -> Path:
    return write_packed(model, path, model_name=MODEL, model_args=ARGS, recipe=recipe, **options)


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def test_binary_convolutions_round_trip_to_bit_identical_logits(model_and_recipe: tuple, images: torch.Tensor,
                                                                tmp_path: Path) -> None:
    model, recipe = model_and_recipe
    path = _write(model, recipe, tmp_path / "model.safetensors")
    expected = _logits(model, images)
    reference, packed = load(path, runtime="reference"), load(path, runtime="packed")
    assert torch.equal(_logits(reference, images), expected)
    assert torch.equal(_logits(packed, images), expected)  # BinaryConv2d on the float path there
    loaded = {name: m for name, m in reference.named_modules() if isinstance(m, BinaryConv2d)}
    assert any(m.groups > 1 for m in loaded.values()) and all(m.weight_is_binary for m in loaded.values())
    assert all(bool(m.input_binarizer.threshold_started) for m in loaded.values())  # not started again
    assert any(isinstance(m, BinaryConv2d) for m in packed.modules())
    assert read_packed(path).metadata["format_version"] == str(FORMAT_VERSION) == "2"


def test_a_binary_convolution_is_stored_as_rows_of_sign_bits(model_and_recipe: tuple, tmp_path: Path) -> None:
    model, recipe = model_and_recipe
    stored = read_packed(_write(model, recipe, tmp_path / "model.safetensors")).tensors
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    for name, layer in layers.items():
        shape = list(layer.weight.shape)
        columns = math.prod(shape[1:])
        assert f"{name}.weight" not in stored
        assert stored[f"{name}.weight_shape"].tolist() == shape and len(shape) == 4
        assert stored[f"{name}.weight_packed"].shape == (shape[0], math.ceil(columns / 8))
        assert stored[f"{name}.weight_scale"].shape == (shape[0], 1)
        signs, scale = layer.binary_weight()
        bits = np.unpackbits(stored[f"{name}.weight_packed"].numpy(), axis=1, count=columns, bitorder="little")
        unpacked = torch.from_numpy(bits.astype(bool))
        assert torch.equal(unpacked, signs.detach().reshape(shape[0], -1) > 0)  # W.reshape(out, -1), row order
        assert torch.equal(stored[f"{name}.weight_scale"], scale.detach())


def test_32_bit_words_and_a_re_export_are_exact(model_and_recipe: tuple, images: torch.Tensor,
                                               tmp_path: Path) -> None:
    model, recipe = model_and_recipe
    first = _write(model, recipe, tmp_path / "a.safetensors")
    words = load(_write(model, recipe, tmp_path / "b.safetensors", word_bits=32), runtime="reference")
    assert torch.equal(_logits(words, images), _logits(model, images))
    again = _write(load(first, runtime="reference"), recipe, tmp_path / "c.safetensors")  # from fixed weights
    assert tensors_hash(load_file(str(again))) == tensors_hash(load_file(str(first)))


def test_the_float_export_expands_convolutions_to_their_shape(model_and_recipe: tuple, tmp_path: Path) -> None:
    model, recipe = model_and_recipe
    path = write_float(model, tmp_path / "float.safetensors", model_name=MODEL, model_args=ARGS, recipe=recipe)
    tensors = load_file(str(path))
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, BinaryConv2d))
    assert torch.equal(tensors[f"{name}.weight"], layer.effective_weight().detach())


def test_a_format_version_1_file_still_loads(tmp_path: Path) -> None:
    """Version 1 held binary linears only, in the layout version 2 keeps for them: a linear model's file with
    format_version 1 is what the didbq before convolutions wrote."""
    torch.manual_seed(0)
    model = didbq.build_model("test_vit", **ARGS)
    conversion = convert(model, "xnor")
    model = trained(model, steps=1)
    written = write_packed(model, tmp_path / "v2.safetensors", model_name="test_vit", model_args=ARGS,
                           recipe=conversion.recipe)
    old = rewrite(written, tmp_path / "v1.safetensors", {"format_version": "1"})
    assert read_packed(old).metadata["format_version"] == "1"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(load(old, runtime="reference"), images), _logits(model, images))
    shapes = [t for k, t in read_packed(old).tensors.items() if k.endswith(".weight_shape")]
    assert shapes and all(t.numel() == 2 for t in shapes)
