"""Image-classification data for distillation, always as Hugging Face `datasets.Dataset`s.

Sources (`load_image_data(source)`), tried in this order:

- built-in offline sets: "fashion-mnist" (Debian's `dataset-fashion-mnist` IDX files) and "digits"
  (scikit-learn's `load_digits`). Their images are stored as `Array2D` uint8, built straight from the numpy
  buffer as an Arrow list array: 60k images take about 0.1 s (`Dataset.from_dict` takes about 2 s, and `Image()`
  would PNG-encode 70k images once and decode them on every access). Nothing is written to disk.
- a local file or folder: a folder of parquet/arrow/csv/json files, a `save_to_disk` folder, or an image folder
  (`class/xxx.png`, optionally under `train/` and `test/`). The image-folder builder numbers classes by folder
  name in alphabetical order: `class_names` is that order, not any order the data set may have elsewhere.
- anything else is a Hugging Face hub name. With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE only the local cache is
  tried; without them, a hub that cannot be reached within 3 s is an error at once (the hub client would retry
  for ~25 s).

`TransformedImages` turns a split into normalised tensors. Augmentation is a pure function of
(seed, epoch, index), so a resumed or DDP run sees exactly the images an uninterrupted single process sees;
`epoch_order` and `batches_for_rank` give the matching batch order.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from didbq.errors import DidbqError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS_TEST_SIZE = 300
SUPPORTED = "fashion-mnist, digits, an image folder, parquet/arrow/csv/json files, or a hub name when online"
IMAGE_NAMES = ("image", "img", "pixel_values")
LABEL_NAMES = ("label", "labels", "fine_label", "target")
TEST_SPLITS = ("test", "validation", "valid", "val")
DATA_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
AUGMENTS = ("none", "light", "timm")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Array image columns up to this size become one uint8 tensor in TransformedImages (~10 ms for Fashion-MNIST);
# larger ones are read row by row.
MATERIALIZE_BYTES = 1 << 30
HUB_PROBE_SECONDS = 3.0


# ----------------------------------------------------------------------------------------------------- loading
@dataclass
class ImageData:
    """A train/test pair of splits and what the rest of didbq needs to know about them."""

    train: datasets.Dataset
    test: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]
    source: str

    @property
    def num_classes(self) -> int:
        """The classifier width: one logit per class name."""
        return len(self.class_names)


def load_image_data(
    source: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    test_split: str | None = None,
    test_fraction: float = 0.1,
) -> ImageData:
    """Load `source` (see the module docstring) as train/test `datasets.Dataset`s with detected columns.

    Without a test split, `test_fraction` of train is split off with `seed`; limits keep the first N rows after a
    seeded shuffle, so small runs are reproducible."""
    splits = _load_splits(source)
    train_name = _train_split_name(splits, source)
    features = splits[train_name].features
    image_column = _pick_image_column(features, image_column, source)
    label_column = _pick_label_column(features, label_column, image_column, source)
    splits = _prepare_columns(splits, image_column, label_column)
    train, test = _train_and_test(splits, train_name, label_column, test_split, test_fraction, seed, source)
    train = _limit(train, train_limit, seed, "train_limit")
    test = _limit(test, test_limit, seed, "test_limit")
    channels, image_size = _describe_images(train, image_column)
    return ImageData(
        train=train, test=test, image_column=image_column, label_column=label_column,
        class_names=_class_names(train, test, label_column, source), channels=channels,
        image_size=image_size, source=source,
    )


def _load_splits(source: str) -> dict[str, datasets.Dataset]:
    """Built-in names first (so a folder called `digits` needs `./digits`), then local paths, then the hub."""
    key = source.strip().lower().replace("_", "-")
    if key == "fashion-mnist":
        return _fashion_mnist()
    if key == "digits":
        return _digits()
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, source)
    if _looks_like_path(source):
        raise DidbqError(f"no such file or folder: {source} (didbq supports: {SUPPORTED})")
    return _load_hub(source)


def _fashion_mnist() -> dict[str, datasets.Dataset]:
    """The Debian package's IDX files, read with numpy (about 0.3 s for all 70k images)."""
    files = {split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    missing = [name for pair in files.values() for name in pair if not (FASHION_MNIST_DIR / name).is_file()]
    if missing:
        raise DidbqError(
            f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}/{missing[0]} is missing): "
            "`apt-get update && apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or give a local folder/file"
        )
    return {split: _array_dataset(_read_idx(str(FASHION_MNIST_DIR / images)),
                                  _read_idx(str(FASHION_MNIST_DIR / labels)), FASHION_MNIST_CLASSES)
            for split, (images, labels) in files.items()}


@lru_cache(maxsize=4)
def _read_idx(path: str) -> np.ndarray:
    """One gzipped IDX file as a read-only uint8 array (cached: tests and sweeps load the set repeatedly)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DidbqError(f"{path} is not an uint8 IDX file (bad magic number); reinstall dataset-fashion-mnist")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    values = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise DidbqError(f"{path} is truncated: {values.size} values for shape {dims}; reinstall the package")
    return values.reshape(dims)


def _digits() -> dict[str, datasets.Dataset]:
    """scikit-learn's 8x8 digits (values 0..16) as uint8 0..255, with a fixed 1,497/300 split (seed 0)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DidbqError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    parts = {"train": np.sort(order[DIGITS_TEST_SIZE:]), "test": np.sort(order[:DIGITS_TEST_SIZE])}
    names = [str(name) for name in bunch.target_names]
    return {split: _array_dataset(images[rows], bunch.target[rows], names) for split, rows in parts.items()}


def _array_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """(N, H, W) uint8 images as an `Array2D` column, built from the numpy buffer without a Python loop."""
    count, height, width = images.shape
    features = datasets.Features({
        "image": datasets.Array2D((height, width), "uint8"),
        "label": datasets.ClassLabel(names=list(class_names)),
    })
    pixels = pa.array(np.ascontiguousarray(images).reshape(-1), type=pa.uint8())
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, count * height * width + 1, width, dtype=np.int32)), pixels)
    grids = pa.ListArray.from_arrays(pa.array(np.arange(0, count * height + 1, height, dtype=np.int32)), rows)
    schema = features.arrow_schema
    image = pa.ExtensionArray.from_storage(schema.field("image").type, grids)
    table = pa.Table.from_arrays([image, pa.array(np.asarray(labels, dtype=np.int64))], schema=schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _looks_like_path(source: str) -> bool:
    """A missing local path should say so, not be looked up on the hub (hub names can contain '/' too)."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or Path(source).suffix.lower() in DATA_BUILDERS


def _load_local(path: Path, source: str) -> dict[str, datasets.Dataset]:
    """A data file, a folder of data files, a `save_to_disk` folder, or an image folder."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _load_builder(source, "load_from_disk", data_dir=str(path))
    if path.is_file():
        builder = DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DidbqError(f"cannot read {source}: unknown file type '{path.suffix}' "
                             f"(use one of {', '.join(DATA_BUILDERS)}, or an image folder)")
        return _load_builder(source, builder, data_files=str(path))
    suffixes = {file.suffix.lower() for file in path.rglob("*") if file.is_file() and _is_data_file(file)}
    if len(suffixes) > 1:
        raise DidbqError(f"{source} mixes data file types ({', '.join(sorted(suffixes))}); keep one type per folder")
    builder = DATA_BUILDERS[suffixes.pop()] if suffixes else "imagefolder"
    return _load_builder(source, builder, data_dir=str(path))


def _is_data_file(file: Path) -> bool:
    """Data files, not an image folder's `metadata.csv/jsonl` nor hidden files."""
    return file.suffix.lower() in DATA_BUILDERS and not file.name.startswith((".", "metadata."))


def _load_builder(source: str, builder: str, **kwargs: str) -> dict[str, datasets.Dataset]:
    """`datasets.load_dataset` on local data, with its failures as one line (the cache is HF_DATASETS_CACHE)."""
    try:
        if builder == "load_from_disk":
            loaded = datasets.load_from_disk(kwargs["data_dir"])
        else:
            loaded = datasets.load_dataset(builder, **kwargs)
    except Exception as error:  # a corrupt file or an empty folder: say which, without a traceback
        raise DidbqError(f"cannot read {source} as {builder}: {_first_line(error)}") from error
    return _as_splits(loaded)


def _load_hub(name: str) -> dict[str, datasets.Dataset]:
    """Offline, try only the cache; with no reachable hub, fail at once (the hub client retries for ~25 s)."""
    if _offline():
        try:
            return _as_splits(datasets.load_dataset(name))
        except Exception as error:  # offline mode raises ConnectionError/FileNotFoundError for an uncached set
            raise DidbqError(_offline_message(name, "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not "
                                                    "in the local cache")) from error
    endpoint = _hub_endpoint()
    if not _hub_reachable(endpoint):
        raise DidbqError(_offline_message(name, f"{endpoint} cannot be reached (with a cached copy, set "
                                                "HF_DATASETS_OFFLINE=1)"))
    try:
        return _as_splits(datasets.load_dataset(name))
    except datasets.exceptions.DatasetNotFoundError as error:
        raise DidbqError(f"dataset '{name}' is neither on the Hugging Face hub nor a local file or folder "
                         f"(didbq supports: {SUPPORTED})") from error
    except Exception as error:  # gated, needs a config name, a network failure midway: one line, cause kept
        raise DidbqError(f"cannot load dataset '{name}' from the Hugging Face hub: {_first_line(error)}") from error


def _offline_message(name: str, reason: str) -> str:
    return (f"dataset '{name}' is not available offline: {reason}; go online, or train offline on "
            f"--data fashion-mnist or a local folder/file (didbq supports: {SUPPORTED})")


def hub_problem() -> str | None:
    """Why the Hugging Face hub cannot be used now (offline flags, or no connection within a few seconds), or
    None: what hub commands check first, so that they fail at once with one line instead of retrying."""
    if _offline():
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    endpoint = _hub_endpoint()
    return None if _hub_reachable(endpoint) else f"{endpoint} cannot be reached"


def _offline() -> bool:
    import huggingface_hub.constants

    return bool(getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
                or getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))


def _hub_endpoint() -> str:
    import huggingface_hub.constants

    return huggingface_hub.constants.ENDPOINT


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """A TCP connect in a daemon thread, so that a hanging DNS lookup cannot block us either.
    Behind a proxy a direct connect proves nothing: trust the client then."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def _as_splits(loaded: datasets.Dataset | datasets.DatasetDict) -> dict[str, datasets.Dataset]:
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------------------------- columns
def _train_split_name(splits: dict[str, datasets.Dataset], source: str) -> str:
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return next(iter(splits))
    raise DidbqError(f"{source} has no 'train' split (splits: {', '.join(splits)}); rename one to train")


def _describe_columns(features: datasets.Features) -> str:
    """'image (Image), label (ClassLabel)': what an error message lists."""
    def kind(feature: object) -> str:
        dtype = getattr(feature, "dtype", None)
        return f"{type(feature).__name__}({dtype})" if isinstance(feature, datasets.Value) else type(feature).__name__

    return ", ".join(f"{name} ({kind(feature)})" for name, feature in features.items())


def _column_error(what: str, reason: str, features: datasets.Features, source: str) -> DidbqError:
    option = f"{what}_column"
    return DidbqError(f"cannot tell which column of {source} holds the {what}s: {reason}; columns: "
                      f"{_describe_columns(features)}; pass {option}=... (CLI: --{option.replace('_', '-')})")


def _pick_column(features: datasets.Features, pool: list[str], typed: list[str], names: tuple[str, ...],
                 what: str, source: str) -> str:
    """One typed column of `pool` wins; among several, or without any, the conventionally named one must be
    unique. Errors list all `features`."""
    if len(typed) == 1:
        return typed[0]
    named = [name for name in (typed or pool) if name in names]
    if len(named) == 1:
        return named[0]
    reason = f"several candidates ({', '.join(named or typed)})" if named or typed else "none found"
    raise _column_error(what, reason, features, source)


def _require_column(features: datasets.Features, name: str, what: str, source: str) -> str:
    if name not in features:
        raise DidbqError(f"{what} column '{name}' is not in {source}; columns: {_describe_columns(features)}")
    return name


def _pick_image_column(features: datasets.Features, explicit: str | None, source: str) -> str:
    """An Image or Array2D/3D column, else one named image/img/pixel_values."""
    if explicit is not None:
        return _require_column(features, explicit, "image", source)
    typed = [name for name, feature in features.items()
             if isinstance(feature, (datasets.Image, datasets.Array2D, datasets.Array3D))]
    return _pick_column(features, list(features), typed, IMAGE_NAMES, "image", source)


def _pick_label_column(features: datasets.Features, explicit: str | None, image_column: str, source: str) -> str:
    """A ClassLabel column, else one named label/labels/fine_label/target; integers or strings."""
    if explicit is not None:
        name = _require_column(features, explicit, "label", source)
    else:
        pool = [key for key in features if key != image_column]
        typed = [key for key in pool if isinstance(features[key], datasets.ClassLabel)]
        name = _pick_column(features, pool, typed, LABEL_NAMES, "label", source)
    feature = features[name]
    if not (isinstance(feature, datasets.ClassLabel) or _is_int_or_string(feature)):
        raise DidbqError(f"label column '{name}' of {source} holds {type(feature).__name__}"
                         f"({getattr(feature, 'dtype', '')}), not class ids or names; pass label_column=...")
    return name


def _is_int_or_string(feature: object) -> bool:
    dtype = getattr(feature, "dtype", "") if isinstance(feature, datasets.Value) else ""
    return dtype.startswith(("int", "uint")) or dtype in ("string", "large_string")


def _prepare_columns(splits: dict[str, datasets.Dataset], image_column: str,
                     label_column: str) -> dict[str, datasets.Dataset]:
    """Path/bytes image columns become `Image()`; string labels become one ClassLabel (sorted names) everywhere."""
    prepared = {}
    names = _string_label_names(splits, label_column)
    for split, dataset in splits.items():
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary"):
            dataset = dataset.cast_column(image_column, datasets.Image())
        if names is not None:
            dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=names))
        prepared[split] = dataset
    return prepared


def _string_label_names(splits: dict[str, datasets.Dataset], label_column: str) -> list[str] | None:
    features = [dataset.features[label_column] for dataset in splits.values()]
    if not any(isinstance(f, datasets.Value) and f.dtype in ("string", "large_string") for f in features):
        return None
    return sorted({value for dataset in splits.values() for value in dataset.unique(label_column)})


# -------------------------------------------------------------------------------------------------- splits
def _train_and_test(splits: dict[str, datasets.Dataset], train_name: str, label_column: str,
                    test_split: str | None, test_fraction: float, seed: int,
                    source: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The named test split, else the first labelled one of test/validation/valid/val, else a seeded split-off.
    (ImageNet-style test splits with label -1 everywhere are skipped.)"""
    train = splits[train_name]
    if test_split is not None:
        if test_split not in splits:
            raise DidbqError(f"{source} has no split '{test_split}' (splits: {', '.join(splits)})")
        return train, splits[test_split]
    for name in TEST_SPLITS:
        if name in splits and name != train_name and _labelled(splits[name], label_column):
            return train, splits[name]
    if not 0.0 < test_fraction < 1.0:
        raise DidbqError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    test_rows = math.ceil(test_fraction * len(train))
    if test_rows >= len(train):
        raise DidbqError(f"{source} has {len(train)} images: too few to split off a test set of {test_fraction:g}")
    # by hand: Dataset.train_test_split(keep_in_memory=True) fails on cached (file-backed) data in datasets 5
    order = np.random.default_rng(seed).permutation(len(train))
    return _rows(train, order[test_rows:]), _rows(train, order[:test_rows])


def _labelled(dataset: datasets.Dataset, label_column: str) -> bool:
    labels = _arrow_column(dataset, label_column)
    if len(labels) == 0:
        return False
    return not pa.types.is_integer(labels.type) or pc.max(labels).as_py() >= 0


def _limit(dataset: datasets.Dataset, limit: int | None, seed: int, option: str) -> datasets.Dataset:
    """The first `limit` rows after a seeded shuffle (the permutation `Dataset.shuffle(seed=seed)` uses)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise DidbqError(f"{option} must be a positive number of images, got {limit}")
    return _rows(dataset, np.random.default_rng(seed).permutation(len(dataset))[:limit])


def _rows(dataset: datasets.Dataset, rows: np.ndarray) -> datasets.Dataset:
    """A row selection whose index table stays in memory: no cache file next to the user's data."""
    return dataset.select(rows, keep_in_memory=True)


def _class_names(train: datasets.Dataset, test: datasets.Dataset, label_column: str, source: str) -> list[str]:
    """ClassLabel names in the source's order; plain integer labels are named '0'..str(max)."""
    feature = train.features[label_column]
    highest = -1
    for split, dataset in (("train", train), ("test", test)):
        labels = _arrow_column(dataset, label_column)
        if len(labels) == 0:
            continue
        low, high = pc.min_max(labels).values()
        if labels.null_count or low.as_py() < 0:
            raise DidbqError(f"the {split} split of {source} has missing or negative labels in '{label_column}' "
                             "(unlabelled rows?); pass test_split=... or another label_column")
        highest = max(highest, high.as_py())
    if isinstance(feature, datasets.ClassLabel):
        if highest >= feature.num_classes:
            raise DidbqError(f"label {highest} in {source} is outside its {feature.num_classes} class names")
        return list(feature.names)
    return [str(index) for index in range(highest + 1)]


def _describe_images(train: datasets.Dataset, image_column: str) -> tuple[int, tuple[int, int]]:
    """Channels and (h, w) as stored, from the first image."""
    if len(train) == 0:
        raise DidbqError("the train split is empty")
    pixels = _to_chw(train.with_format(None)[0][image_column], image_column)
    return int(pixels.shape[0]), (int(pixels.shape[1]), int(pixels.shape[2]))


def _arrow_column(dataset: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """A column with select/shuffle applied. `datasets` keeps those as an index table (`_indices`) and its own
    gather is ~50x slower than pyarrow's take on 60k rows."""
    column = dataset.data.column(name)
    indices = getattr(dataset, "_indices", None)
    return column if indices is None else column.take(indices.column(0))


# ------------------------------------------------------------------------------------------------- pixels
def _to_chw(value: object, column: str) -> torch.Tensor:
    """One stored image (PIL, array or nested list) as uint8 [C, H, W] with C in (1, 3); alpha is dropped."""
    if value is None:
        raise DidbqError(f"image column '{column}' has an empty row")
    if isinstance(value, PILImage.Image):
        value = _pil_pixels(value)
    return torch.from_numpy(_chw_batch(np.asarray(value)[None], column)[0])


def _pil_pixels(image: PILImage.Image) -> np.ndarray:
    if image.mode not in ("L", "RGB"):
        grey = image.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F", "LA", "La")
        image = image.convert("L" if grey else "RGB")
    return np.array(image)


def _chw_batch(array: np.ndarray, column: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) pixels as contiguous uint8 (N, C, H, W), C in (1, 3)."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3, 4)):
        raise DidbqError(f"image column '{column}' holds arrays of shape {array.shape[1:]}; expected (H, W), "
                         "(H, W, C) or (C, H, W) with C in 1, 3, 4")
    return np.ascontiguousarray(_as_uint8(array[:, :3], column))


def _as_uint8(array: np.ndarray, column: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iub" and (array.size == 0 or (array.min() >= 0 and array.max() <= 255)):
        return array.astype(np.uint8)
    raise DidbqError(f"image column '{column}' holds {array.dtype} values in [{array.min()}, {array.max()}]; "
                     "didbq expects 8-bit pixels (0..255)")


def _materialize(split: datasets.Dataset, column: str) -> torch.Tensor | None:
    """The whole Array/list image column as one uint8 [N, C, H, W] tensor, or None (Image() features, ragged
    or too large: read per row). Takes ~10 ms for Fashion-MNIST's 60k images."""
    if isinstance(split.features[column], datasets.Image) or len(split) == 0:
        return None
    stored = split.data.column(column)
    indices = getattr(split, "_indices", None)
    positions = None if indices is None else indices.column(0)
    if positions is not None and stored.nbytes > MATERIALIZE_BYTES:
        stored, positions = stored.take(positions), None
    if stored.nbytes > MATERIALIZE_BYTES:
        return None
    array = _nested_to_numpy(stored)
    if array is None:
        return None
    if positions is not None:
        array = array[positions.to_numpy()]
    return torch.from_numpy(_chw_batch(array, column))


def _nested_to_numpy(column: pa.ChunkedArray) -> np.ndarray | None:
    """Nested Arrow lists of equal lengths as one numpy array; None when ragged, nullable or not lists."""
    parts = []
    for chunk in column.chunks:
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        if len(values) == 0:
            continue
        if values.null_count:
            return None
        dims = []
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
                or pa.types.is_fixed_size_list(values.type):
            low, high = pc.min_max(pc.list_value_length(values)).values()
            if low.as_py() != high.as_py() or values.null_count:
                return None
            dims.append(low.as_py())
            values = values.flatten()
        if not dims or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            return None
        parts.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), *dims))
    if not parts or len({part.shape[1:] for part in parts}) != 1:
        return None
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------- transforms
@dataclass
class TransformSpec:
    """What the model wants to see; `augment` applies to training splits only."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "light"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise DidbqError(f"unknown augment '{self.augment}'; use one of {', '.join(AUGMENTS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise DidbqError(f"unknown interpolation '{self.interpolation}'; use one of {', '.join(INTERPOLATIONS)}")
        channels = self.input_size[0]
        if channels not in (1, 3) or len(self.input_size) != 3:
            raise DidbqError(f"input size must be (C, H, W) with C 1 or 3, got {self.input_size}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise DidbqError(f"mean {self.mean} and std {self.std} need {channels} values for {self.input_size}")


def transform_spec_for(
    model: nn.Module,
    augment: str = "light",
    input_size: int | tuple[int, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> TransformSpec:
    """The model's own (C, H, W) (it may be built with img_size=28 or in_chans=1, which its pretrained config does
    not know), its mean/std/interpolation from timm's data config, each overridable."""
    from timm.data import resolve_model_data_config

    from didbq.convert.walker import model_input_size

    config = resolve_model_data_config(model)
    channels, height, width = model_input_size(model)
    if input_size is not None:
        channels, height, width = _full_input_size(input_size, channels)
    interpolation = config.get("interpolation")
    return TransformSpec(
        input_size=(channels, height, width),
        mean=_fit_channels(mean if mean is not None else config["mean"], channels, "mean"),
        std=_fit_channels(std if std is not None else config["std"], channels, "std"),
        augment=augment,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )


def preprocessing(spec: TransformSpec) -> dict[str, Any]:
    """What a packed file records of the evaluation transform, in timm's pretrained_cfg keys: the images are
    resized straight to the input size (crop_pct 1.0 of a square image) and normalised."""
    return {"input_size": list(spec.input_size), "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation, "crop_pct": 1.0, "crop_mode": "center"}


def _full_input_size(size: int | tuple[int, ...], channels: int) -> tuple[int, int, int]:
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) == 2:
        return channels, size[0], size[1]
    if len(size) == 3:
        return size[0], size[1], size[2]
    raise DidbqError(f"input size must be S, (H, W) or (C, H, W), got {size}")


def _fit_channels(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    """ImageNet's 3-channel statistics averaged for a 1-channel model, or one value repeated for 3."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 3 and channels == 1:
        return (sum(values) / 3,)
    if len(values) == 1 and channels == 3:
        return values * 3
    raise DidbqError(f"{what} {values} does not fit a {channels}-channel model")


class TransformedImages(torch.utils.data.Dataset):
    """Wraps an ImageData split: returns (float tensor [C,H,W] normalised, int label).

    Greyscale is expanded to 3 channels when the model wants 3 (and RGB averaged when it wants 1). Images are
    resized straight to (H, W) (no aspect-preserving crop) with PIL's filters. "light" shifts by up to 1/8 of the side with zero
    fill (random crop of the padded image) and flips, at the stored resolution before the resize; everything
    but "timm" runs on tensors. Augmentation is deterministic per (seed, epoch, index): `__getitem__` seeds its
    own RNG from these, so a resumed run (which skips already-seen batches by index) and a DDP run see exactly
    the same augmented images as an uninterrupted single-process run. `set_epoch(epoch)` changes the
    augmentation. Test splits (`train=False`) are never augmented."""

    def __init__(self, split: datasets.Dataset, data: ImageData, spec: TransformSpec, train: bool,
                 seed: int = 0) -> None:
        self.spec, self.train, self.seed, self.epoch = spec, train, seed, 0
        self.augment = spec.augment if train else "none"
        self.image_column = data.image_column
        self._labels = torch.from_numpy(_arrow_column(split, data.label_column).to_numpy().astype(np.int64))
        self._pixels = _materialize(split, data.image_column)
        self._rows = None if self._pixels is not None else split.with_format(None).select_columns([data.image_column])
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self._timm = _timm_transform(spec) if self.augment == "timm" else None

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of this epoch (call before iterating, in every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if self._pixels is not None:
            pixels = self._pixels[index]
        else:
            pixels = _to_chw(self._rows[index][self.image_column], self.image_column)
        label = int(self._labels[index])
        if self._timm is not None:
            return self._timm_item(pixels, index), label
        return self._tensor_item(pixels, index), label

    def _item_rng(self, index: int) -> random.Random:
        """An RNG that depends only on (seed, epoch, index), the same in every process and on resume."""
        return random.Random(f"didbq/{self.seed}/{self.epoch}/{index}")

    def _tensor_item(self, pixels: torch.Tensor, index: int) -> torch.Tensor:
        channels, height, width = self.spec.input_size
        if channels == 1 and pixels.shape[0] == 3:
            pixels = pixels.float().mean(0, keepdim=True).round_().to(torch.uint8)
        if self.augment == "light":
            pixels = _shift_and_flip(pixels, self._item_rng(index))
        image = _resize(pixels, (height, width), self.spec.interpolation).float()
        # a 1-channel image broadcasts against the model's 3 channel statistics: that is the expansion
        return torch.addcmul(self._shift, image, self._scale).expand(channels, height, width).contiguous()

    def _timm_item(self, pixels: torch.Tensor, index: int) -> torch.Tensor:
        array = pixels.permute(1, 2, 0).numpy()
        image = PILImage.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        image = image.convert("L" if self.spec.input_size[0] == 1 else "RGB")
        with _seeded_global_rngs(self._item_rng(index).getrandbits(63)):
            return self._timm(image)


def _shift_and_flip(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Random crop of the image zero-padded by 1/8 of each side, then a horizontal flip with p=0.5."""
    _, height, width = image.shape
    pad_y, pad_x = max(1, round(height / 8)), max(1, round(width / 8))
    dy, dx = rng.randint(-pad_y, pad_y), rng.randint(-pad_x, pad_x)
    flip = rng.random() < 0.5
    out = torch.zeros_like(image)
    out[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[:, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out.flip(-1) if flip else out


def _resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 [C, H, W] resized with torch's uint8 antialiased kernels, which are PIL's filters (bilinear gives
    PIL's pixels exactly, bicubic within 2 levels) and faster than PIL (28->224: ~0.12 ms)."""
    if tuple(image.shape[-2:]) == size:
        return image
    if interpolation == "nearest":
        return F.interpolate(image[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(image[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]


def _timm_transform(spec: TransformSpec) -> object:
    from timm.data import create_transform

    return create_transform(input_size=spec.input_size, is_training=True, interpolation=spec.interpolation,
                            mean=spec.mean, std=spec.std)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """timm's transforms draw from Python's, numpy's and torch's global RNGs: seed them, then restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ------------------------------------------------------------------------------------------------ batching
def epoch_order(length: int, epoch: int, seed: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (length, epoch, seed)."""
    seed_value = random.Random(f"didbq-order/{seed}/{epoch}").getrandbits(63)
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed_value))


def batches_for_rank(order: torch.Tensor, global_batch: int, rank: int, world: int,
                     drop_last: bool = True) -> list[list[int]]:
    """This rank's share of each global batch of `order`: `world` contiguous shards, so rank r's k-th batch
    concatenated over ranks is the single-process k-th batch, and resuming at batch k is `[k:]`.

    With drop_last=False the final partial batch is split as evenly as tensor_split does; it is kept only if
    every rank gets at least one sample (all ranks must run the same number of steps)."""
    if global_batch <= 0 or world <= 0 or global_batch % world:
        raise DidbqError(f"the global batch size ({global_batch}) must be a positive multiple of the number of "
                         f"processes ({world})")
    if not 0 <= rank < world:
        raise DidbqError(f"rank {rank} is outside 0..{world - 1}")
    batches = []
    for start in range(0, len(order), global_batch):
        chunk = order[start:start + global_batch]
        if len(chunk) < global_batch and (drop_last or len(chunk) < world):
            break
        batches.append(torch.tensor_split(chunk, world)[rank].tolist())
    return batches
