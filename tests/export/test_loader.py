"""didbq.load gives back exactly the model that was written (bit-identical logits on real Fashion-MNIST images),
and refuses files it cannot trust with one-line errors (never unpickling anything)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from badfiles import BAD_FILES, bad_file
from safetensors.torch import load_file

import didbq
from didbq.convert.recipe import PAPER_DIDB
from didbq.convert.walker import convert
from didbq.errors import DidbqError
from didbq.export import load, load_into, read_packed, write_packed
from didbq.export.format import tensors_hash
from didbq.nn import BinaryLinear, set_binarization
from didbq.train.data import TransformedImages, load_image_data, transform_spec_for

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2, "in_chans": 1,
        "num_classes": 10}


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """128 training and 64 test images of Fashion-MNIST, transformed as didbq's runner does."""
    data = load_image_data("fashion-mnist", train_limit=128, test_limit=64)
    spec = transform_spec_for(didbq.build_model(MODEL, **ARGS), augment="none")
    train = TransformedImages(data.train, data, spec, train=False)
    test = TransformedImages(data.test, data, spec, train=False)
    return {"train": torch.stack([train[i][0] for i in range(len(train))]),
            "labels": torch.tensor([train[i][1] for i in range(len(train))]),
            "test": torch.stack([test[i][0] for i in range(len(test))])}


def trained(recipe: str, images: dict[str, torch.Tensor], weights: bool = True, activations: bool = True,
            steps: int = 6) -> tuple[torch.nn.Module, object]:
    """A tiny ViT converted by `recipe` and trained a few steps on real images, in eval mode."""
    torch.manual_seed(0)
    model = didbq.build_model(MODEL, **ARGS)
    conversion = convert(model, recipe)
    set_binarization(model, weights=weights, activations=activations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = slice(32 * (step % 4), 32 * (step % 4 + 1))
        loss = torch.nn.functional.cross_entropy(model(images["train"][batch]), images["labels"][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), conversion


def write(model: torch.nn.Module, conversion, path: Path, **options) -> Path:  # noqa: ANN001
    return write_packed(model, path, model_name=MODEL, model_args=ARGS, recipe=conversion.recipe, **options)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("recipe, weights, activations", [
    ("didb", True, True), (PAPER_DIDB, True, True), (PAPER_DIDB, True, False), (PAPER_DIDB, False, False),
    ("xnor", True, True), ("bit", True, True)])
def test_loaded_logits_are_bit_identical(recipe: str, weights: bool, activations: bool,
                                         images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model, conversion = trained(recipe, images, weights, activations)
    path = write(model, conversion, tmp_path / "model.safetensors")
    loaded = load(path, runtime="reference")
    assert not loaded.training
    assert torch.equal(logits(loaded, images["test"]), logits(model, images["test"]))
    assert torch.equal(logits(load(path, runtime="packed"), images["test"]), logits(model, images["test"]))
    binary = [m for m in loaded.modules() if isinstance(m, BinaryLinear)]
    assert all(m.weight_is_binary == weights and m.binarize_weights == weights for m in binary)
    stored = read_packed(path).tensors
    assert any(k.endswith(".weight_packed") for k in stored) == weights
    if weights:  # a binary weight is never stored unpacked
        assert not any(k.endswith(".weight") and k[:-7] in dict(loaded.named_modules())
                       and isinstance(dict(loaded.named_modules())[k[:-7]], BinaryLinear) for k in stored)


def test_words_of_32_bits_and_a_re_export_are_exact(images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model, conversion = trained(PAPER_DIDB, images)
    first = write(model, conversion, tmp_path / "a.safetensors")
    words = load(write(model, conversion, tmp_path / "b.safetensors", word_bits=32))
    assert torch.equal(logits(words, images["test"]), logits(model, images["test"]))
    again = write(load(first, runtime="reference"), conversion, tmp_path / "c.safetensors")  # from a loaded model
    assert tensors_hash(load_file(str(again))) == tensors_hash(load_file(str(first)))


def test_fp16_parts_make_a_smaller_file_that_loads(images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model, conversion = trained(PAPER_DIDB, images)
    full = write(model, conversion, tmp_path / "fp32.safetensors")
    half = write(model, conversion, tmp_path / "fp16.safetensors", fp_dtype="float16")
    assert half.stat().st_size < 0.8 * full.stat().st_size
    loaded = load(half)
    assert torch.equal(loaded.head.weight, model.head.weight.half().float())
    assert torch.isfinite(logits(loaded, images["test"])).all()


def test_a_run_folder_loads_through_its_model_file(images: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model, conversion = trained("xnor", images, steps=2)
    write(model, conversion, tmp_path / "model.safetensors")
    (tmp_path / "run.json").write_text("{}")
    assert torch.equal(logits(didbq.load(tmp_path), images["test"]), logits(model, images["test"]))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DidbqError, match="no model.safetensors; the run has not finished") as error:
        didbq.load(tmp_path)
    assert f"didbq binarize --resume {tmp_path}" in str(error.value)  # the command that works, folder included


# ------------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_file(images: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, conversion = trained("xnor", images, steps=2)
    return write(model, conversion, tmp_path_factory.mktemp("good") / "model.safetensors")


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused_with_one_line(case: str, good_file: Path, tmp_path: Path) -> None:
    path = bad_file(case, good_file, tmp_path)
    with pytest.raises(DidbqError) as error:
        load(path)
    message = str(error.value)
    assert BAD_FILES[case] in message and "\n" not in message, message
    assert not (tmp_path / "UNPICKLED").exists()


def test_a_file_for_another_model_is_refused_by_load_into(good_file: Path) -> None:
    other = didbq.binarize_model(didbq.build_model("test_vit"), "xnor")
    with pytest.raises(DidbqError, match="written for vit_tiny_patch16_224, not test_vit"):
        load_into(other, good_file)


def test_the_header_holds_what_the_issue_lists(good_file: Path) -> None:
    metadata = read_packed(good_file).metadata
    for key in ("format", "format_version", "didbq_version", "model_name", "model_args", "recipe", "binarization",
                "fp_dtype", "bit_order", "sign_convention", "tensors_sha256"):
        assert key in metadata, key
    assert metadata["model_name"] == MODEL and metadata["model_args"] == ARGS
    assert metadata["recipe"]["attention"]["probs"] == "threshold"  # the xnor preset, resolved
    assert metadata["binarization"] == {"weights": True, "activations": True}
