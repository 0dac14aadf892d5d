"""`didbq.load`: a packed file (or a run folder holding one) back into the model it was written from.

The timm architecture is rebuilt from the metadata (name and arguments, no pretrained weights), the stored
recipe converts it, every binary layer (BinaryLinear, BinaryConv2d) gets its unpacked signs times its scale as a
fixed binary weight (fix_binary_weight), every other tensor is loaded as stored, the activation binarizers are
set as they were, and the model is returned in eval mode. In fp32 on the CPU its outputs are bit-identical to those of
the in-memory model that was written.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from didbq.convert.models import build_model
from didbq.convert.recipe import Recipe, parse_recipe
from didbq.convert.walker import Conversion, convert
from didbq.errors import DidbqError
from didbq.export.format import PACKED, SCALE, SHAPE, PackedFile, read_packed, verify_hash
from didbq.export.packing import packed_columns, signs_as_values, unpack_signs
from didbq.nn.binarizers import ActivationBinarizer
from didbq.nn.binary import BinaryLayer

MODEL_FILE = "model.safetensors"


@dataclass
class Loaded:
    model: nn.Module
    conversion: Conversion
    packed: PackedFile


def resolve(path: Path | str) -> Path:
    """A packed file, the model.safetensors of a run folder or a Hub folder, or of `hf-hub:ORG/NAME`."""
    if str(path).startswith("hf-hub:"):
        from didbq.export.hub import download

        path = download(str(path))
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / MODEL_FILE).exists():
        return path / MODEL_FILE
    if (path / "run.json").exists():
        older = " (it was written before didbq packed its models: re-run it)" if (
            path / "student.safetensors").exists() else f"; the run has not finished: didbq binarize --resume {path}"
        raise DidbqError(f"{path}: no {MODEL_FILE}{older}")
    raise DidbqError(f"{path}: not a run folder (no {MODEL_FILE}); give a run folder or a packed .safetensors file")


def stored_recipe(packed: PackedFile) -> Recipe:
    return parse_recipe(json.dumps(packed.metadata["recipe"]), source=f"{packed.path} (metadata)")


def rebuild(path: Path | str) -> Loaded:
    """Read the file, rebuild and convert the architecture, load the weights (see the module docstring)."""
    packed = read_packed(resolve(path))
    metadata = packed.metadata
    model = build_model(metadata["model_name"], pretrained=False, **metadata["model_args"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rules that match nothing were reported when the model was converted
        conversion = convert(model, stored_recipe(packed))
    apply_packed(model, packed)
    carry_preprocessing(model, metadata)
    return Loaded(model.eval(), conversion, packed)


def carry_preprocessing(model: nn.Module, metadata: dict) -> None:
    """The run's preprocessing and labels in the model's pretrained_cfg (input size, mean, std, interpolation,
    crop, num_classes, label_names), so that timm.data.resolve_data_config({}, model=model) and create_transform
    give what training evaluated with. Files without them (written outside a run) keep timm's own."""
    update = dict(metadata.get("preprocessing") or {})
    if update:
        update["input_size"] = tuple(update["input_size"])
        update["mean"], update["std"] = tuple(update["mean"]), tuple(update["std"])
    if metadata.get("class_names"):
        update.update(num_classes=len(metadata["class_names"]), label_names=list(metadata["class_names"]))
    if update:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **update}
        model.default_cfg = model.pretrained_cfg


def load(path: Path | str, runtime: str = "auto") -> nn.Module:
    """The model in a packed file or run folder, rebuilt, in eval mode, on the CPU (see the module docstring).

    `runtime`: "reference" runs the binary layers as floats (torch's kernels); "packed" keeps their weights
    packed and runs popcount kernels (didbq.runtime; an error where they cannot be built); "auto" (default) is
    packed where the kernels are available and otherwise the float path, with one warning saying why."""
    from didbq.runtime import use_runtime

    return use_runtime(rebuild(path).model, runtime)


def load_into(model: nn.Module, path: Path | str) -> nn.Module:
    """Load a packed file into `model`, already converted with the file's recipe (binarize_model)."""
    packed = read_packed(resolve(path))
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    stored = packed.metadata["model_name"].split(".")[0]
    if architecture is not None and architecture != stored:
        raise DidbqError(f"{packed.path} was written for {stored}, not {architecture}; load it with "
                         f"didbq.load(path), which rebuilds {stored}")
    apply_packed(model, packed)
    return model.eval()


def _misfits(model: nn.Module, packed: PackedFile) -> list[str]:
    """What in the file does not fit `model`: missing, unexpected and misshapen tensors."""
    layers = {name for name, m in model.named_modules() if isinstance(m, BinaryLayer)}
    stored = set(packed.binary_layers)
    tensors = packed.tensors
    expected: dict[str, tuple[int, ...] | None] = {}
    for key, tensor in model.state_dict().items():
        prefix = key[: -len(".weight")]
        if key.endswith(".weight") and prefix in stored and prefix in layers:
            rows, columns = tensor.shape[0], math.prod(tensor.shape[1:])
            words = packed_columns(columns, 8 if tensors[f"{prefix}.{PACKED}"].element_size() == 1 else 32)
            expected.update({f"{prefix}.{PACKED}": (rows, words), f"{prefix}.{SHAPE}": (tensor.dim(),),
                             f"{prefix}.{SCALE}": (rows, 1)})
            if tensors[f"{prefix}.{SHAPE}"].tolist() != list(tensor.shape):
                expected[f"{prefix}.{SHAPE}"] = None  # the stored shape is not the layer's
        else:
            expected[key] = tuple(tensor.shape)
    problems = [f"{k} missing" for k in expected if k not in tensors]
    problems += [f"{k} unexpected" for k in tensors if k not in expected]
    problems += [f"{k} {tuple(tensors[k].shape) if shape else tensors[k].tolist()} vs {shape or 'the layer'}"
                 for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != shape]
    return problems


def apply_packed(model: nn.Module, packed: PackedFile) -> None:
    """Load a read packed file into a converted model: fixed binary weights, the rest as stored."""
    problems = _misfits(model, packed)
    if problems:
        raise DidbqError(f"{packed.path}: the file does not fit {packed.metadata['model_name']} "
                         f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}): it was written for "
                         f"another model, another recipe or another timm version")
    verify_hash(packed)
    stored = set(packed.binary_layers)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BinaryLayer)}
    rest = {}
    for key, tensor in packed.tensors.items():
        if not key.endswith((PACKED, SHAPE, SCALE)) or key.rsplit(".", 1)[0] not in stored:
            rest[key] = tensor
    result = model.load_state_dict(rest, strict=False)
    if result.unexpected_keys:  # cannot happen after _misfits; guards against a model that renames its state
        raise DidbqError(f"{packed.path}: unexpected tensors {', '.join(result.unexpected_keys[:3])}")
    for name, layer in layers.items():
        if name in stored:
            tensors = {part: packed.tensors[f"{name}.{part}"] for part in (PACKED, SHAPE, SCALE)}
            columns = math.prod(tensors[SHAPE].tolist()[1:])
            signs = signs_as_values(unpack_signs(tensors[PACKED], columns), layer.weight.dtype)
            layer.fix_binary_weight(signs, tensors[SCALE])
        else:
            layer.binarize_weights = False
    activations = packed.metadata["binarization"].get("activations", True)
    for name, module in model.named_modules():
        if isinstance(module, ActivationBinarizer):
            module.enabled = activations if isinstance(activations, bool) else name in activations


EXPORT_FORMATS = ("packed", "float", "hub")
_CARRIED = ("results", "metrics", "class_names", "data", "preprocessing")  # run metadata a re-export keeps


def export(source: Path | str, out: Path | str, *, format: str = "packed", fp_dtype: str = "float32",
           word_bits: int = 8, force: bool = False) -> Path:
    """Write the model in `source` (a packed file or run folder) to `out` again:
    - packed: the packed format, e.g. with fp16 parts or 32 signs per int32 word (exact: the binary weights are
      the same signs and scales);
    - float: an unpacked safetensors state dict for inspection, each binary weight expanded to signs * scale
      (`weight`); other tools can read it, but it is not a training checkpoint (the latent weights are not in
      it) and didbq.load reads packed files only;
    - hub: a folder in the Hugging Face Hub's layout (didbq.export.hub.export_hub), which didbq.load reads.
    """
    from didbq.export.format import write_float, write_packed

    out = Path(out)
    if format not in EXPORT_FORMATS:
        raise DidbqError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if format == "hub":
        from didbq.export.hub import export_hub

        return export_hub(source, out, force)
    if out.exists() and not force:
        raise DidbqError(f"{out} exists; pass --force to overwrite it")
    loaded = rebuild(source)
    if out.resolve() == loaded.packed.path.resolve():
        raise DidbqError(f"{out} is the file being exported; choose another --out")
    metadata = loaded.packed.metadata
    options = {"model_name": metadata["model_name"], "model_args": metadata["model_args"],
               "recipe": loaded.conversion.recipe, "fp_dtype": fp_dtype,
               "extra": {key: metadata[key] for key in _CARRIED if key in metadata}}
    if format == "float":
        return write_float(loaded.model, out, **options)
    return write_packed(loaded.model, out, word_bits=word_bits, **options)
