"""Cost accounting: parameters per bit width, packed size, and BOPs / FLOPs / OPs (method.md section 7).

Convention: a multiply-accumulate counts as a BOP only when both operands are 1-bit; every other MAC of a linear
layer, convolution or attention product is a FLOP; OPs = FLOPs + BOPs / 64. Norms, softmax, biases, activations and
elementwise terms are not counted (the field's convention). Counts are per image, measured by running the model.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from didbq.nn.linear import BinaryLinear
from didbq.observe import fresh_cores, run_observed

BOPS_PER_OP = 64
SCALE_BYTES = 4  # per output row, fp32
SHAPE_BYTES = 16  # weight_shape: two int64


@dataclass
class LayerCost:
    name: str
    kind: str  # linear | conv | q·kᵀ | attn·v ...
    weights: str  # "1-bit" | "fp32" | "-" (attention products have no weights)
    inputs: str  # "1-bit" | "fp"
    macs: int
    binary: bool
    added_by_method: bool = False  # HFSC's extra projection and products do not exist in the FP model

    @property
    def bops(self) -> int:
        return self.macs if self.binary else 0

    @property
    def flops(self) -> int:
        return 0 if self.binary else self.macs


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

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BOPS_PER_OP

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else math.inf

    @property
    def ops_reduction(self) -> float:
        return self.fp_reference_flops / self.ops if self.ops else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "ops": self.ops, "compression": self.compression,
                "ops_reduction": self.ops_reduction}


@dataclass
class CostReport:
    layers: list[LayerCost] = field(default_factory=list)
    totals: Totals | None = None


def _linear_cost(name: str, module: nn.Module, inputs: torch.Tensor, images: int) -> LayerCost:
    in_features, out_features = module.in_features, module.out_features
    macs = inputs.numel() // in_features * in_features * out_features // images
    if isinstance(module, BinaryLinear):
        binary_weights, binary_inputs = module.binarize_weights, module.inputs_binary
        return LayerCost(name, "linear", "1-bit" if binary_weights else "fp", "1-bit" if binary_inputs else "fp",
                         macs, binary_weights and binary_inputs, added_by_method=".binary_core." in f".{name}.")
    return LayerCost(name, "linear", "fp", "fp", macs, False)


def _conv_cost(name: str, module: nn.Conv2d | nn.Conv1d, output: torch.Tensor, images: int) -> LayerCost:
    per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
    return LayerCost(name, "conv", "fp", "fp", output.numel() * per_output // images, False)


def measure_costs(model: nn.Module, example: torch.Tensor) -> list[LayerCost]:
    """Run `model` on `example` and return the cost of every linear, convolution and attention product."""
    images = example.shape[0]
    costs: dict[str, LayerCost] = {}

    def record(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cost = (_conv_cost(name, module, output, images) if isinstance(module, (nn.Conv1d, nn.Conv2d))
                else _linear_cost(name, module, args[0], images))
        if name in costs:  # a module that runs several times per forward (shared) costs each time
            costs[name].macs += cost.macs
        else:
            costs[name] = cost

    hooks = [module.register_forward_hook(lambda m, a, o, name=name: record(name, m, a, o))
             for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, BinaryLinear, nn.Conv1d, nn.Conv2d))]
    cores = fresh_cores(model)
    run_observed(model, example, hooks)
    layers = list(costs.values())
    for name, core in cores.items():
        for product, macs, binary in core.products():
            added = product.startswith("q·kᵀ band")
            layers.append(LayerCost(f"{name}.{product}", product, "-", "1-bit" if binary else "fp",
                                    macs // images, binary, added_by_method=added))
    return sorted(layers, key=lambda layer: _natural_key(layer.name))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _binary_weight_names(model: nn.Module) -> dict[str, BinaryLinear]:
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, BinaryLinear) and m.binarize_weights}


def packed_bytes(model: nn.Module, fp_bytes_per_element: int | None = None) -> int:
    """Analytic size of the packed file's tensors: sign bits 8 per byte along the input dimension (rows padded
    to whole bytes), an fp32 scale per row, the weight shape, and every other state tensor at its own width
    (or `fp_bytes_per_element`, e.g. 2 for fp16, for floating-point tensors)."""
    binary = _binary_weight_names(model)
    total = 0
    for key, tensor in model.state_dict().items():
        if key in binary:
            rows, columns = tensor.shape
            total += rows * math.ceil(columns / 8) + rows * SCALE_BYTES + SHAPE_BYTES
        elif tensor.is_floating_point() and fp_bytes_per_element is not None:
            total += tensor.numel() * fp_bytes_per_element
        else:
            total += tensor.numel() * tensor.element_size()
    return total


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
        fp_reference_flops=sum(layer.macs for layer in layers if not layer.added_by_method))
