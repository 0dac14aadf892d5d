"""Cost accounting: parameters per bit width, packed size, and BOPs / FLOPs / OPs (method.md section 7).

Convention: a multiply-accumulate counts as a BOP only when both operands are 1-bit; every other MAC of a linear
layer, convolution or attention product is a FLOP; OPs = FLOPs + BOPs / 64. Norms, softmax, biases, activations and
elementwise terms are not counted (the field's convention). Counts are per image, measured by running the model.

The report (`didbq report`) adds to this what a written file shows: the size measured from the packed file against
the analytic size (a gap over 1% is an error), the full-precision MACs cross-checked against
torch.utils.flop_counter on the unconverted model, per-block totals and a chart.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from didbq.errors import DidbqError
from didbq.nn.binary import BinaryLayer
from didbq.nn.conv import BinaryConv2d
from didbq.nn.linear import BinaryLinear
from didbq.observe import fresh_cores, run_observed

BOPS_PER_OP = 64
SCALE_BYTES = 4  # per output row, fp32
SHAPE_BYTES = 8  # weight_shape: one int64 per dimension (two for a linear, four for a convolution)


@dataclass
class LayerCost:
    name: str
    kind: str  # linear | conv | q·kᵀ | attn·v ...
    weights: str  # "1-bit" | "fp32" | "-" (attention products have no weights)
    inputs: str  # "1-bit" | "fp"
    macs: int
    binary: bool
    added_by_method: bool = False  # HFSC's extra projection and products do not exist in the FP model
    binary_parameters: int = 0  # the layer's own state (weight, bias, input threshold, norm), per bit width
    fp_parameters: int = 0
    bytes: int = 0  # analytic, as in the packed file (fp32 parts)

    @property
    def bops(self) -> int:
        return self.macs if self.binary else 0

    @property
    def flops(self) -> int:
        return 0 if self.binary else self.macs

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BOPS_PER_OP

    def as_dict(self) -> dict:
        return {**asdict(self), "bops": self.bops, "flops": self.flops, "ops": self.ops}


@dataclass
class Totals:
    binary_parameters: int
    fp_parameters: int
    buffer_bytes: int
    packed_bytes: int
    fp32_bytes: int
    bops: int
    flops: int
    fp_reference_flops: int
    packed_bytes_fp16: int = 0  # the same file with its floating-point tensors in fp16

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BOPS_PER_OP

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else math.inf

    @property
    def compression_fp16(self) -> float:
        return self.fp32_bytes / self.packed_bytes_fp16 if self.packed_bytes_fp16 else math.inf

    @property
    def binary_share(self) -> float:
        """The share of parameters stored at 1 bit."""
        parameters = self.binary_parameters + self.fp_parameters
        return self.binary_parameters / parameters if parameters else 0.0

    @property
    def ops_reduction(self) -> float:
        return self.fp_reference_flops / self.ops if self.ops else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "ops": self.ops, "compression": self.compression,
                "compression_fp16": self.compression_fp16, "binary_share": self.binary_share,
                "ops_reduction": self.ops_reduction}


def _layer_cost(name: str, kind: str, module: nn.Module, macs: int) -> LayerCost:
    """A MAC is a BOP only where the layer's weights and inputs are both binary now."""
    if isinstance(module, BinaryLayer):
        binary_weights, binary_inputs = module.binarize_weights, module.inputs_binary
        return LayerCost(name, kind, "1-bit" if binary_weights else "fp", "1-bit" if binary_inputs else "fp",
                         macs, binary_weights and binary_inputs, added_by_method=".binary_core." in f".{name}.")
    return LayerCost(name, kind, "fp", "fp", macs, False)


def _linear_cost(name: str, module: nn.Module, inputs: torch.Tensor, images: int) -> LayerCost:
    in_features, out_features = module.in_features, module.out_features
    return _layer_cost(name, "linear", module, inputs.numel() // in_features * in_features * out_features // images)


def _conv_cost(name: str, module: nn.Module, output: torch.Tensor, images: int) -> LayerCost:
    """out_h * out_w * out_channels * (in_channels / groups) * kh * kw MACs per image (BinaryConv2d's output
    after its norm, shortcut and activation has the convolution's shape)."""
    per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
    return _layer_cost(name, "conv", module, output.numel() * per_output // images)


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, BinaryConv2d)


def measure_costs(model: nn.Module, example: torch.Tensor) -> list[LayerCost]:
    """Run `model` on `example` and return the cost of every linear, convolution and attention product, with
    the parameters and analytic bytes of each layer's own state."""
    images = example.shape[0]
    costs: dict[str, LayerCost] = {}

    def record(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cost = (_conv_cost(name, module, output, images) if isinstance(module, _CONVOLUTIONS)
                else _linear_cost(name, module, args[0], images))
        if name in costs:  # a module that runs several times per forward (shared) costs each time
            costs[name].macs += cost.macs
        else:
            costs[name] = cost

    hooks = [module.register_forward_hook(lambda m, a, o, name=name: record(name, m, a, o))
             for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, BinaryLinear, *_CONVOLUTIONS))]
    cores = fresh_cores(model)
    run_observed(model, example, hooks)
    sizes = state_sizes(model)
    layers = list(costs.values())
    for layer in layers:
        for key, size in sizes.items():
            if key.startswith(layer.name + "."):
                layer.binary_parameters += size.binary_parameters
                layer.fp_parameters += size.fp_parameters
                layer.bytes += size.bytes
    for name, core in cores.items():
        for product, macs, binary in core.products():
            added = product.startswith("q·kᵀ band")
            layers.append(LayerCost(f"{name}.{product}", product, "-", "1-bit" if binary else "fp",
                                    macs // images, binary, added_by_method=added))
    return sorted(layers, key=lambda layer: _natural_key(layer.name))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _binary_weight_names(model: nn.Module) -> dict[str, BinaryLayer]:
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, BinaryLayer) and m.binarize_weights}


@dataclass
class StateSize:
    """One state tensor as the packed file stores it."""

    binary_parameters: int
    fp_parameters: int  # nn.Parameters only (buffers count in bytes, not as parameters)
    bytes: int
    binary: bool


def state_sizes(model: nn.Module, fp_bytes_per_element: int | None = None, word_bits: int = 8
                ) -> dict[str, StateSize]:
    """Every state tensor's analytic size in the packed file: a binary weight as sign bits `word_bits` per word
    along each output channel's row (rows padded to whole words), a scale per row and the weight shape; every other
    tensor at its own width (or `fp_bytes_per_element`, e.g. 2 for fp16, for floating-point tensors, scales
    included)."""
    binary = _binary_weight_names(model)
    parameters = {name for name, _ in model.named_parameters()}
    sizes = {}
    for key, tensor in model.state_dict().items():
        if key in binary:
            rows, columns = tensor.shape[0], math.prod(tensor.shape[1:])
            scale = fp_bytes_per_element or SCALE_BYTES
            packed = rows * math.ceil(columns / word_bits) * word_bits // 8
            sizes[key] = StateSize(rows * columns, 0, packed + rows * scale + SHAPE_BYTES * tensor.dim(), True)
            continue
        width = (fp_bytes_per_element if tensor.is_floating_point() and fp_bytes_per_element is not None
                 else tensor.element_size())
        sizes[key] = StateSize(0, tensor.numel() if key in parameters else 0, tensor.numel() * width, False)
    return sizes


def packed_bytes(model: nn.Module, fp_bytes_per_element: int | None = None, word_bits: int = 8) -> int:
    """Analytic size of the packed file's tensors (state_sizes summed; the header is not counted)."""
    return sum(size.bytes for size in state_sizes(model, fp_bytes_per_element, word_bits).values())


def state_bytes(model: nn.Module) -> int:
    """Size of the model's state as stored unpacked (every tensor at its own width)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def totals(model: nn.Module, layers: list[LayerCost], fp32_bytes: int) -> Totals:
    binary = _binary_weight_names(model)
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    binary_parameters = sum(state[k].numel() for k in binary)
    fp_parameters = sum(p.numel() for k, p in parameters.items() if k not in binary)
    buffers = sum(t.numel() * t.element_size() for k, t in state.items() if k not in parameters)
    return Totals(
        binary_parameters=binary_parameters, fp_parameters=fp_parameters, buffer_bytes=buffers,
        packed_bytes=packed_bytes(model), fp32_bytes=fp32_bytes,
        bops=sum(layer.bops for layer in layers), flops=sum(layer.flops for layer in layers),
        fp_reference_flops=sum(layer.macs for layer in layers if not layer.added_by_method),
        packed_bytes_fp16=packed_bytes(model, 2))


# ------------------------------------------------------------------------------------------------ per block

def block_of(name: str) -> str:
    """The block a module or tensor belongs to: its name up to the last numbered part (blocks.3,
    layers.1.blocks.0), else its first part (patch_embed, head, cls_token)."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbered[-1] + 1]) if numbered else parts[0]


@dataclass
class BlockCost:
    name: str
    binary_parameters: int = 0
    binary_bytes: int = 0  # packed signs, scales and shapes
    fp_bytes: int = 0  # everything else, at fp32
    bops: int = 0
    flops: int = 0

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BOPS_PER_OP

    def as_dict(self) -> dict:
        return {**asdict(self), "ops": self.ops}


def block_costs(model: nn.Module, layers: list[LayerCost]) -> list[BlockCost]:
    """Bytes and OPs per block, in model order: where the bits and the OPs go."""
    blocks: dict[str, BlockCost] = {}
    for key, size in state_sizes(model).items():
        block = blocks.setdefault(block_of(key), BlockCost(block_of(key)))
        block.binary_parameters += size.binary_parameters
        if size.binary:
            block.binary_bytes += size.bytes
        else:
            block.fp_bytes += size.bytes
    for layer in layers:
        block = blocks.setdefault(block_of(layer.name), BlockCost(block_of(layer.name)))
        block.bops += layer.bops
        block.flops += layer.flops
    return list(blocks.values())


# ------------------------------------------------------------------------------------------------ checks

MAX_SIZE_GAP = 0.01
MAX_FLOP_GAP = 0.01


class _Gap:
    """A measured quantity against its expected value: the relative gap, and whether it is within `limit`."""

    limit = MAX_SIZE_GAP

    def _compared(self) -> tuple[int, int]:  # (measured, expected)
        raise NotImplementedError

    @property
    def gap(self) -> float:
        measured, expected = self._compared()
        return measured / expected - 1 if expected else math.inf

    @property
    def ok(self) -> bool:
        return abs(self.gap) <= self.limit

    def as_dict(self) -> dict:
        return {**asdict(self), "gap": self.gap, "ok": self.ok}


@dataclass
class FileCheck(_Gap):
    """The packed file's size, measured, against the analytic size of its tensors."""

    path: str
    fp_dtype: str
    file_bytes: int
    header_bytes: int  # length prefix, JSON header with tensor index and metadata
    payload_bytes: int  # tensor data measured from the file
    analytic_bytes: int  # state_sizes at the file's floating-point width

    def _compared(self) -> tuple[int, int]:
        return self.payload_bytes, self.analytic_bytes


@dataclass
class FlopCheck(_Gap):
    """Full-precision MACs of the report against torch.utils.flop_counter on the unconverted model."""

    limit = MAX_FLOP_GAP
    torch_macs: int  # FlopCounterMode's FLOPs / 2 (it counts a multiply-accumulate as 2 FLOPs)
    report_macs: int  # the report's full-precision reference (all MACs of the FP model's layers and products)

    def _compared(self) -> tuple[int, int]:
        return self.report_macs, self.torch_macs


def reference_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs per image of the unconverted model by torch.utils.flop_counter, attention unfused so that its
    products are counted (the fused CPU kernel is not). Changes `model`: pass a copy or a fresh model."""
    from torch.utils.flop_counter import FlopCounterMode

    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    model.eval().requires_grad_(False)  # the counter's module tracker needs tensors without autograd history
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2 // example.shape[0]


def check_file(path: Path, model: nn.Module) -> FileCheck:
    """Measure the packed file at `path` (written from `model`) against the analytic size of its tensors."""
    from didbq.export.format import FP_DTYPES, read_header, read_metadata

    header, header_bytes = read_header(path)
    metadata = read_metadata(path)
    fp_dtype = metadata["fp_dtype"]
    word_bits = 32 if "int32" in metadata.get("pack", "") else 8
    width = FP_DTYPES[fp_dtype].itemsize if fp_dtype != "float32" else None
    size = Path(path).stat().st_size
    check = FileCheck(str(path), fp_dtype, size, header_bytes, size - header_bytes,
                      packed_bytes(model, width, word_bits))
    if not check.ok:
        raise DidbqError(f"{path}: its tensors take {check.payload_bytes:,} bytes but the analytic size is "
                         f"{check.analytic_bytes:,} ({check.gap:+.1%}, more than {MAX_SIZE_GAP:.0%}); the file is "
                         f"not packed as the report counts it")
    return check


# ------------------------------------------------------------------------------------------------ the report

@dataclass
class Report:
    """Everything `didbq report` shows: the plan (what is binary, what stays FP and why, costs per layer and in
    total), costs per block, the file measured against the analytic size and the FLOP cross-check."""

    plan: Any  # didbq.convert.Plan
    blocks: list[BlockCost]
    file: FileCheck | None
    flop_check: FlopCheck | None
    source: str  # "analytic" (a model and a recipe) or the packed file's path
    results: dict[str, Any] = field(default_factory=dict)  # stage accuracies stored in the file

    def as_dict(self) -> dict[str, Any]:
        return {**self.plan.as_dict(), "source": self.source, "blocks": [b.as_dict() for b in self.blocks],
                "file": self.file.as_dict() if self.file else None,
                "flop_check": self.flop_check.as_dict() if self.flop_check else None, "results": self.results}


def report_for_model(model_name: str, recipe: Any = "didb", model_args: dict[str, Any] | None = None, *,
                     fp_dtype: str = "float32", strict: bool = True) -> Report:
    """The report of MODEL under a recipe before any training: the model is built without weights, converted,
    and written once to a temporary packed file whose size is measured."""
    import copy
    import tempfile

    from didbq.convert import build_model, load_recipe, plan
    from didbq.convert.walker import example_input_for
    from didbq.export.format import write_packed

    recipe = load_recipe(recipe)
    arguments = {**recipe.model.args, **(model_args or {})}
    model = build_model(model_name, pretrained=False, **arguments)
    reference = reference_macs(copy.deepcopy(model), example_input_for(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        the_plan = plan(model, recipe, strict=strict, model_name=model_name)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="didbq-report-") as folder:
        path = Path(folder) / "model.safetensors"
        write_packed(model, path, model_name=model_name, model_args=arguments, recipe=the_plan.recipe,
                     fp_dtype=fp_dtype)
        file = check_file(path, model)
    file.path = "(temporary file)"
    return Report(the_plan, block_costs(model, the_plan.layers), file,
                  FlopCheck(reference, the_plan.totals.fp_reference_flops), "analytic")


def report_for_file(path: Path | str) -> Report:
    """The report of a packed file or run folder: the model as didbq.load rebuilds it, measured."""
    from didbq.convert import build_model
    from didbq.convert.plan import account
    from didbq.export.loader import rebuild

    loaded = rebuild(path)
    metadata, conversion = loaded.packed.metadata, loaded.conversion
    reference = build_model(metadata["model_name"], pretrained=False, **metadata["model_args"])
    fp32_bytes = state_bytes(reference)
    macs = reference_macs(reference, conversion.example_input)
    the_plan = account(loaded.model, conversion, fp32_bytes, metadata["model_name"])
    file = check_file(loaded.packed.path, loaded.model)
    return Report(the_plan, block_costs(loaded.model, the_plan.layers), file,
                  FlopCheck(macs, the_plan.totals.fp_reference_flops), str(loaded.packed.path),
                  metadata.get("results") or {})


def plot_report(report: Report, path: Path) -> Path:
    """A PNG with two panels per block: bytes (1-bit weights vs full precision) and OPs (BOPs/64 vs FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from didbq.train.checkpoint import atomic_path

    blocks = report.blocks
    names = [b.name for b in blocks]
    positions = list(range(len(blocks)))
    figure, (sizes, ops) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.28 * len(blocks) + 1.5)), sharey=True)
    binary_kb = [b.binary_bytes / 1e3 for b in blocks]
    fp_kb = [b.fp_bytes / 1e3 for b in blocks]
    sizes.barh(positions, binary_kb, color="#1f77b4", label="1-bit weights (packed, with scales)")
    sizes.barh(positions, fp_kb, left=binary_kb, color="#ff7f0e", label="full precision (fp32)")
    sizes.set_xlabel("kB")
    sizes.set_title("where the bits go")
    binary_ops = [b.bops / BOPS_PER_OP / 1e6 for b in blocks]
    fp_ops = [b.flops / 1e6 for b in blocks]
    ops.barh(positions, binary_ops, color="#1f77b4", label="BOPs / 64")
    ops.barh(positions, fp_ops, left=binary_ops, color="#ff7f0e", label="FLOPs (MACs)")
    ops.set_xlabel("million OPs per image")
    ops.set_title("where the OPs go")
    sizes.set_yticks(positions, names, fontsize=7)
    sizes.invert_yaxis()
    for axis in (sizes, ops):
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
        axis.grid(axis="x", alpha=0.3)
    totals = report.plan.totals
    figure.suptitle(f"{report.plan.model_name}, recipe {report.plan.recipe.name}: "
                    f"{totals.packed_bytes / 1e6:.2f} MB packed ({totals.compression:.1f}x smaller than fp32), "
                    f"{totals.ops:.3g} OPs", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return path
