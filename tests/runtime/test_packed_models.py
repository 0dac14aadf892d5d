"""Whole models on the packed runtime: logits equal to the float path's to the last bit on real Fashion-MNIST
images (the demo model, DeiT-S under xnor and didb, a windowed and a hierarchical model), the memory they hold,
torch.export of a loaded packed model, and `didbq bench` (`eval --runtime`: tests/train/test_runner.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import didbq
from didbq.convert.walker import convert
from didbq.export import load, write_packed
from didbq.runtime import PackedBinaryLinear
from didbq.runtime.bench import held_bytes
from didbq.runtime.modules import PackedBinaryAttention
from didbq.train.data import TransformedImages, load_image_data, transform_spec_for

QUICK_ARGS = {"img_size": 28, "patch_size": 7, "depth": 6, "embed_dim": 192, "num_heads": 3, "in_chans": 1,
              "num_classes": 10}


@pytest.fixture(scope="module")
def fashion() -> object:
    return load_image_data("fashion-mnist", train_limit=64, test_limit=32)


def real_images(model: torch.nn.Module, data: object, split: str = "test") -> torch.Tensor:
    """Fashion-MNIST images transformed for `model` as didbq's runner does (resized, greyscale expanded)."""
    return torch.stack([image for image, _ in _transformed(model, data, split)])


def _transformed(model: torch.nn.Module, data: object, split: str) -> list[tuple[torch.Tensor, int]]:
    images = TransformedImages(getattr(data, split), data, transform_spec_for(model, augment="none"), train=False)
    return [images[i] for i in range(len(images))]


def packed_file(name: str, args: dict, recipe: str, data: object, folder: Path, steps: int = 0) -> Path:
    """`name` converted by `recipe`, its data-aware scales set on real images (and `steps` of training), written."""
    torch.manual_seed(0)
    model = didbq.build_model(name, **args)
    conversion = convert(model, recipe)
    examples = _transformed(model, data, "train")[:16]
    images = torch.stack([image for image, _ in examples])
    labels = torch.tensor([label for _, label in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(max(steps, 1)):
        logits = model(images)
        if steps:
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return write_packed(model.eval(), folder / f"{name}-{recipe}.safetensors", model_name=name, model_args=args,
                        recipe=conversion.recipe)


def both_runtimes(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    return load(path, runtime="reference"), load(path, runtime="packed")


def assert_same_logits(path: Path, images: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference, packed = both_runtimes(path)
    assert any(isinstance(m, PackedBinaryLinear) for m in packed.modules())
    with torch.no_grad():
        expected, got = reference(images), packed(images)
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    return reference, packed


def test_the_demo_model_is_exact_on_real_images(fashion: object, tmp_path: Path) -> None:
    path = packed_file("vit_tiny_patch16_224", QUICK_ARGS, "quick", fashion, tmp_path, steps=4)
    _, packed = assert_same_logits(path, real_images(didbq.build_model("vit_tiny_patch16_224", **QUICK_ARGS),
                                                     fashion))
    assert all(isinstance(m.binary_core, PackedBinaryAttention) for m in packed.modules()
               if hasattr(m, "binary_core"))


@pytest.mark.parametrize("recipe", ["xnor", "didb"])
def test_deit_small_is_exact_and_holds_an_eighth_of_the_fp32_bytes(recipe: str, fashion: object,
                                                                   tmp_path: Path) -> None:
    args = {"num_classes": 10}
    path = packed_file("deit_small_patch16_224", args, recipe, fashion, tmp_path)
    fp32 = didbq.build_model("deit_small_patch16_224", **args)
    _, packed = assert_same_logits(path, real_images(fp32, fashion)[:4])
    assert held_bytes(packed) <= held_bytes(fp32) / 8
    assert sum(isinstance(m, PackedBinaryLinear) for m in packed.modules()) == 48
    assert not any(type(m).__name__ == "BinaryLinear" for m in packed.modules())


@pytest.mark.parametrize("name, args", [
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32,
                                      "window_size": 7, "num_classes": 10}),
    ("pvt_v2_b0", {"num_classes": 10}),
])
def test_windowed_and_hierarchical_models_are_exact(name: str, args: dict, fashion: object, tmp_path: Path) -> None:
    # pvt_v2's spatial reduction is a binary convolution; its stage 0 attention (3136 queries, 49 keys, head dim
    # 32) ties many keys in Hamming distance under a score scale that is not a power of two
    path = packed_file(name, args, "didb", fashion, tmp_path, steps=1)
    assert_same_logits(path, real_images(didbq.build_model(name, **args), fashion)[:8])


def test_a_loaded_packed_model_exports_and_runs(fashion: object, tmp_path: Path) -> None:
    args = {**QUICK_ARGS, "depth": 2}
    path = packed_file("vit_tiny_patch16_224", args, "xnor", fashion, tmp_path)
    packed = load(path, runtime="packed")
    images = real_images(packed, fashion)[:4]
    exported = torch.export.export(packed, (images,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"didbq.binary_linear.default", "didbq.binary_attention.default"} <= targets
    with torch.no_grad():
        assert torch.equal(exported.module()(images), packed(images))


def test_a_packed_runtime_model_is_not_written_again(fashion: object, tmp_path: Path) -> None:
    from didbq.errors import DidbqError

    path = packed_file("vit_tiny_patch16_224", {**QUICK_ARGS, "depth": 1}, "xnor", fashion, tmp_path)
    with pytest.raises(DidbqError, match="runtime='reference'"):
        write_packed(load(path, runtime="packed"), tmp_path / "again.safetensors", model_name="x", model_args={},
                     recipe=None)


def test_bench_on_the_command_line(fashion: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from didbq.cli import main

    path = packed_file("vit_tiny_patch16_224", {**QUICK_ARGS, "depth": 2}, "didb", fashion, tmp_path)
    main(["bench", str(path), "--batch", "1", "--batch", "3", "--threads", "1", "--rounds", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in result["results"]] == [1, 3]
    assert all(row["max_abs_difference"] == 0 for row in result["results"])
    assert result["kernel"] in ("avx512", "avx2", "portable") and result["threads"] == 1
    assert result["held_bytes"]["packed"] < result["held_bytes"]["reference"]
    for row in result["results"]:
        assert row["packed"]["median_ms"] > 0 and row["speedup_packed_vs_fp32"] > 0


def test_the_lineage_recipe_is_exact_on_the_packed_runtime(fashion: object, tmp_path: Path) -> None:
    """BatchNorm (eval statistics), LayerScale, the context shortcut and HFSC's float-path attention."""
    path = packed_file("vit_tiny_patch16_224", {**QUICK_ARGS, "depth": 2}, "didb_lineage", fashion, tmp_path,
                       steps=2)
    assert_same_logits(path, real_images(didbq.build_model("vit_tiny_patch16_224", **QUICK_ARGS), fashion))
