"""Data loading (offline sets, local folders/files, hub names offline), transforms and the DDP batch order."""
from __future__ import annotations

import random
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from didbq.errors import DidbqError
from didbq.train import data as data_module
from didbq.train.data import (
    ImageData,
    TransformedImages,
    TransformSpec,
    batches_for_rank,
    epoch_order,
    load_image_data,
    transform_spec_for,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' builders cache what they read: keep that out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def fashion() -> ImageData:
    return load_image_data("fashion-mnist")


def _labels(split: datasets.Dataset, column: str = "label") -> np.ndarray:
    return np.asarray(split.with_format("numpy")[:][column])


def _images(split: datasets.Dataset, column: str = "image") -> np.ndarray:
    return np.asarray(split.with_format("numpy")[:][column])


def _array_data(images: np.ndarray, labels: list[int], names: list[str]) -> ImageData:
    """A hand-built ImageData around (N, H, W) or (N, H, W, 3) uint8 images."""
    array = datasets.Array2D if images.ndim == 3 else datasets.Array3D
    features = datasets.Features({"image": array(images.shape[1:], "uint8"), "label": datasets.ClassLabel(names=names)})
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    channels = 1 if images.ndim == 3 else 3
    return ImageData(split, split, "image", "label", names, channels, images.shape[1:3], "hand-built")


# ------------------------------------------------------------------------------------------ built-in sets
def test_fashion_mnist_loads_the_debian_files(fashion: ImageData) -> None:
    assert (len(fashion.train), len(fashion.test)) == (60_000, 10_000)
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[-1] == "Ankle boot"
    assert fashion.num_classes == 10
    assert (fashion.channels, fashion.image_size) == (1, (28, 28))
    assert (fashion.image_column, fashion.label_column, fashion.source) == ("image", "label", "fashion-mnist")
    for split in (fashion.train, fashion.test):
        labels = _labels(split)
        assert labels.min() == 0 and labels.max() == 9
        assert np.bincount(labels).tolist() == [len(split) // 10] * 10  # Fashion-MNIST is balanced
    first = np.asarray(fashion.train.with_format("numpy")[0]["image"])
    assert first.shape == (28, 28) and first.max() > 200 and fashion.train[0]["label"] == 9  # an ankle boot


def test_fashion_mnist_missing_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DidbqError, match="apt-get install dataset-fashion-mnist"):
        load_image_data("fashion-mnist")


def test_digits_are_rescaled_to_bytes_with_a_fixed_split() -> None:
    digits = load_image_data("digits")
    assert (len(digits.train), len(digits.test)) == (1_497, 300)
    assert (digits.channels, digits.image_size, digits.class_names) == (1, (8, 8), [str(i) for i in range(10)])
    pixels = _images(digits.train)
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.array_equal(_labels(load_image_data("digits", seed=5).test), _labels(digits.test))


def test_limits_keep_seeded_rows() -> None:
    first = load_image_data("fashion-mnist", train_limit=40, test_limit=12, seed=1)
    again = load_image_data("fashion-mnist", train_limit=40, test_limit=12, seed=1)
    other = load_image_data("fashion-mnist", train_limit=40, test_limit=12, seed=2)
    assert (len(first.train), len(first.test)) == (40, 12)
    assert np.array_equal(_images(first.train), _images(again.train))
    assert np.array_equal(_labels(first.test), _labels(again.test))
    assert not np.array_equal(_images(first.train), _images(other.train))
    with pytest.raises(DidbqError, match="train_limit"):
        load_image_data("digits", train_limit=0)


# ------------------------------------------------------------------------------------- local files/folders
def _png(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def test_image_folder_keeps_folder_names_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split, counts in (("train", {"dog": 2, "cat": 3}), ("test", {"cat": 1, "dog": 1})):
        for name, count in counts.items():
            for index in range(count):
                _png(root / split / name / f"{index}.png", 10 if name == "cat" else 250)
    pets = load_image_data(str(root))
    assert pets.class_names == ["cat", "dog"]  # the builder's alphabetical folder order
    assert (len(pets.train), len(pets.test), pets.channels, pets.image_size) == (5, 2, 3, (12, 10))
    assert sorted(_labels(pets.train).tolist()) == [0, 0, 0, 1, 1]
    spec = TransformSpec((3, 16, 16), IMAGENET_MEAN, IMAGENET_STD, augment="none")
    for image, label in TransformedImages(pets.train, pets, spec, train=True):
        expected = ((10 if label == 0 else 250) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert image.shape == (3, 16, 16)
        assert torch.allclose(image.mean((1, 2)), expected, atol=1e-5)


def test_image_folder_without_test_split_splits_off_a_seeded_fraction(tmp_path: Path) -> None:
    for index in range(10):
        _png(tmp_path / "flat" / ("a" if index % 2 else "b") / f"{index}.png", index)
    first = load_image_data(str(tmp_path / "flat"), test_fraction=0.3, seed=4)
    again = load_image_data(str(tmp_path / "flat"), test_fraction=0.3, seed=4)
    assert (len(first.train), len(first.test)) == (7, 3)
    assert np.array_equal(_labels(first.test), _labels(again.test))


def _write_parquet(path: Path, columns: dict[str, object], features: dict[str, object]) -> Path:
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


def test_parquet_file_with_standard_columns(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    path = _write_parquet(tmp_path / "shapes.parquet", {"image": images, "label": [i % 3 for i in range(20)]},
                          {"image": datasets.Array2D((8, 8), "uint8"),
                           "label": datasets.ClassLabel(names=["circle", "square", "star"])})
    shapes = load_image_data(str(path), test_fraction=0.25)
    assert shapes.class_names == ["circle", "square", "star"]
    assert (len(shapes.train), len(shapes.test), shapes.channels, shapes.image_size) == (15, 5, 1, (8, 8))
    assert sorted(_images(shapes.train).sum((1, 2)).tolist() + _images(shapes.test).sum((1, 2)).tolist()) == \
        sorted(images.astype(np.int64).sum((1, 2)).tolist())


def test_parquet_file_with_other_column_names_needs_them_named(tmp_path: Path) -> None:
    images = np.zeros((12, 6, 6, 3), np.uint8)
    path = _write_parquet(tmp_path / "odd.parquet",
                          {"pixels": images, "y": [i % 4 for i in range(12)], "note": ["x"] * 12},
                          {"pixels": datasets.Array3D((6, 6, 3), "uint8"), "y": datasets.Value("int64"),
                           "note": datasets.Value("string")})
    with pytest.raises(DidbqError, match=r"pixels \(Array3D\), y \(Value\(int64\)\), note.*label_column=") as error:
        load_image_data(str(path))
    assert "--label-column" in str(error.value) and "\n" not in str(error.value)
    odd = load_image_data(str(path), image_column="pixels", label_column="y", test_fraction=0.25)
    assert (odd.image_column, odd.label_column, odd.class_names) == ("pixels", "y", ["0", "1", "2", "3"])
    assert (odd.channels, odd.image_size, len(odd.train), len(odd.test)) == (3, (6, 6), 9, 3)
    with pytest.raises(DidbqError, match="label column 'nope' is not in"):
        load_image_data(str(path), label_column="nope")


def test_ambiguous_columns_are_errors_naming_the_columns(tmp_path: Path) -> None:
    images = np.zeros((4, 4, 4), np.uint8)
    two_labels = _write_parquet(tmp_path / "two.parquet", {"image": images, "coarse": [0, 1, 0, 1],
                                                           "fine": [0, 1, 2, 3]},
                                {"image": datasets.Array2D((4, 4), "uint8"),
                                 "coarse": datasets.ClassLabel(names=["a", "b"]),
                                 "fine": datasets.ClassLabel(names=["p", "q", "r", "s"])})
    with pytest.raises(DidbqError, match=r"several candidates \(coarse, fine\).*label_column="):
        load_image_data(str(two_labels))
    assert load_image_data(str(two_labels), label_column="fine", test_fraction=0.5).num_classes == 4
    two_images = _write_parquet(tmp_path / "pair.parquet", {"left": images, "right": images, "label": [0, 1, 0, 1]},
                                {"left": datasets.Array2D((4, 4), "uint8"), "right": datasets.Array2D((4, 4), "uint8"),
                                 "label": datasets.ClassLabel(names=["a", "b"])})
    with pytest.raises(DidbqError, match=r"several candidates \(left, right\).*image_column="):
        load_image_data(str(two_images))


def test_csv_with_image_paths_and_string_labels(tmp_path: Path) -> None:
    rows = [(tmp_path / "img" / f"{index}.png", "moth" if index % 2 else "ant") for index in range(6)]
    for path, name in rows:
        _png(path, 30 if name == "ant" else 200, size=(5, 7))
    table = tmp_path / "bugs.csv"
    table.write_text("file,kind\n" + "".join(f"{path},{name}\n" for path, name in rows))
    bugs = load_image_data(str(table), image_column="file", label_column="kind", test_fraction=0.5)
    assert (bugs.class_names, bugs.channels, bugs.image_size, len(bugs.test)) == (["ant", "moth"], 3, (5, 7), 3)


# ------------------------------------------------------------------------------------------------- hub
def test_unknown_hub_name_offline_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(DidbqError, match=r"dataset 'cifar100' is not available offline: .*go online, or train "
                                         r"offline on --data fashion-mnist or a local folder/file \(didbq supports: "
                                         r"fashion-mnist, digits"):
        load_image_data("cifar100")
    assert time.perf_counter() - start < 10


def test_unreachable_hub_fails_fast_without_the_offline_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.perf_counter()
    with pytest.raises(DidbqError, match="not available offline: http://127.0.0.1:9 cannot be reached"):
        load_image_data("someone/some-set")
    assert time.perf_counter() - start < 10


def test_missing_local_path_is_not_looked_up_on_the_hub() -> None:
    with pytest.raises(DidbqError, match="no such file or folder: ./absent.parquet"):
        load_image_data("./absent.parquet")


# ------------------------------------------------------------------------------------------ transforms
def test_constant_images_map_to_normalised_constants() -> None:
    grey = _array_data(np.full((2, 8, 8), 200, np.uint8), [0, 1], ["a", "b"])
    spec = TransformSpec((3, 16, 16), IMAGENET_MEAN, IMAGENET_STD, augment="light")
    image, label = TransformedImages(grey.test, grey, spec, train=False)[1]
    assert (image.shape, image.dtype, label) == ((3, 16, 16), torch.float32, 1)
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)  # greyscale expanded

    colour = _array_data(np.tile(np.array([30, 60, 120], np.uint8), (1, 4, 4, 1)), [0], ["a"])
    mono = TransformSpec((1, 4, 4), (0.5,), (0.25,), augment="none")
    image, _ = TransformedImages(colour.test, colour, mono, train=False)[0]
    assert image.shape == (1, 4, 4) and torch.allclose(image, torch.full((1, 4, 4), (70 / 255 - 0.5) / 0.25))


def test_light_augmentation_is_deterministic_per_seed_epoch_and_index(fashion: ImageData) -> None:
    split = fashion.train.select(range(16))
    spec = TransformSpec((1, 28, 28), (0.5,), (0.5,), augment="light")
    images = TransformedImages(split, fashion, spec, train=True, seed=3)
    epoch0 = torch.stack([images[i][0] for i in range(16)])
    assert torch.equal(epoch0, torch.stack([images[i][0] for i in range(16)]))
    fresh = TransformedImages(split, fashion, spec, train=True, seed=3)
    assert torch.equal(epoch0, torch.stack([fresh[i][0] for i in reversed(range(16))]).flip(0))  # order-free
    images.set_epoch(1)
    epoch1 = torch.stack([images[i][0] for i in range(16)])
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) >= 12
    plain = TransformedImages(split, fashion, spec, train=False)
    assert sum(not torch.equal(a, plain[i][0]) for i, a in enumerate(epoch0)) >= 12
    assert all(torch.allclose(plain[i][0], torch.from_numpy(_images(split)[i]).float().div(127.5).sub(1)[None],
                              atol=1e-6) for i in range(16))


def test_no_augmentation_is_a_pure_function_of_the_image() -> None:
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    twins = _array_data(np.stack([picture, rng.integers(0, 256, (10, 10), dtype=np.uint8), picture]),
                        [0, 1, 0], ["a", "b"])
    spec = TransformSpec((3, 20, 20), IMAGENET_MEAN, IMAGENET_STD, augment="none")
    a = TransformedImages(twins.train, twins, spec, train=True, seed=0)
    b = TransformedImages(twins.train, twins, spec, train=False, seed=9)
    b.set_epoch(5)
    assert torch.equal(a[0][0], a[2][0]) and torch.equal(a[0][0], b[2][0]) and not torch.equal(a[0][0], a[1][0])


def test_timm_augmentation_is_seeded_and_leaves_global_rngs_alone(fashion: ImageData) -> None:
    split = fashion.train.select(range(4))
    spec = TransformSpec((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, augment="timm")
    images = TransformedImages(split, fashion, spec, train=True)
    torch.manual_seed(7)
    random.seed(7)
    first = images[2][0]
    after = (torch.rand(1), random.random())
    torch.manual_seed(7)
    random.seed(7)
    assert (torch.rand(1), random.random()) == after
    assert first.shape == (3, 32, 32) and torch.equal(first, images[2][0])
    images.set_epoch(1)
    assert not torch.equal(first, images[2][0])


def test_transform_spec_follows_the_built_model() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              depth=1, num_classes=10)
    spec = transform_spec_for(model)
    assert spec.input_size == (1, 28, 28) and len(spec.mean) == len(spec.std) == 1
    assert spec.augment == "light" and spec.interpolation in ("bilinear", "bicubic")
    spec = transform_spec_for(model, augment="none", input_size=32, mean=(0.3,), std=(0.2,))
    assert (spec.input_size, spec.mean, spec.std, spec.augment) == ((1, 32, 32), (0.3,), (0.2,), "none")
    with pytest.raises(DidbqError, match="unknown augment 'heavy'"):
        transform_spec_for(model, augment="heavy")


# ------------------------------------------------------------------------------------------- batching
def test_epoch_order_is_a_seeded_permutation() -> None:
    order = epoch_order(1000, epoch=2, seed=5)
    assert torch.equal(order.sort().values, torch.arange(1000))
    assert torch.equal(order, epoch_order(1000, epoch=2, seed=5))
    assert not torch.equal(order, epoch_order(1000, epoch=3, seed=5))
    assert not torch.equal(order, epoch_order(1000, epoch=2, seed=6))


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_batches_concatenate_to_the_single_process_batches(drop_last: bool) -> None:
    order = epoch_order(103, epoch=0, seed=0)
    single = batches_for_rank(order, 8, rank=0, world=1, drop_last=drop_last)
    ranks = [batches_for_rank(order, 8, rank=r, world=2, drop_last=drop_last) for r in range(2)]
    assert len(single) == (12 if drop_last else 13) and all(len(r) == len(single) for r in ranks)
    assert [a + b for a, b in zip(*ranks)] == single
    assert sum(single, []) == order[: 96 if drop_last else 103].tolist()
    with pytest.raises(DidbqError, match="multiple of the number of processes"):
        batches_for_rank(order, 6, rank=0, world=4)


def test_batches_drive_a_dataloader(fashion: ImageData) -> None:
    split = fashion.test.select(range(20))
    spec = TransformSpec((3, 28, 28), IMAGENET_MEAN, IMAGENET_STD)
    images = TransformedImages(split, fashion, spec, train=True)
    batches = batches_for_rank(epoch_order(len(images), 0, 0), 8, rank=1, world=2)
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches[1:])  # resumed at batch 1
    (x, y), = list(loader)
    assert x.shape == (4, 3, 28, 28) and y.tolist() == [images[i][1] for i in batches[1]]
