"""The report counts binary convolutions: BOPs by hand (out_h * out_w * out_channels * in_channels / groups * kh *
kw per image), FLOPs where an operand is full precision, sizes from the packed rows; and a hybrid model's packed
file measures what the analytic report says."""
from __future__ import annotations

from pathlib import Path

import torch
from convmodels import ARGS, MODEL, conv_recipe, trained
from safetensors.torch import load_file
from torch import nn

import didbq
from didbq.convert.walker import convert
from didbq.export import write_packed
from didbq.nn import BinaryConv2d, set_binarization
from didbq.report import measure_costs, report_for_file, state_sizes


def _small() -> nn.Sequential:
    return nn.Sequential(BinaryConv2d(8, 16, 3, stride=2, padding=1, groups=2),  # 10x10 -> 5x5
                         nn.Conv2d(16, 16, 3, padding=1, groups=16))  # depthwise, full precision


def test_binary_convolution_bops_and_sizes_are_the_hand_count() -> None:
    model = _small()
    binary, depthwise = measure_costs(model, torch.randn(2, 8, 10, 10))  # per image: the batch divides out
    assert (binary.kind, binary.weights, binary.inputs) == ("conv", "1-bit", "1-bit")
    assert binary.macs == binary.bops == 5 * 5 * 16 * (8 // 2) * 3 * 3 and binary.flops == 0
    assert depthwise.macs == depthwise.flops == 5 * 5 * 16 * 1 * 3 * 3 and depthwise.bops == 0
    # 16 rows of 36 signs: 5 bytes each, a 4-byte scale per row, four int64 of shape; the bias and threshold
    assert binary.bytes == 16 * 5 + 16 * 4 + 4 * 8 + 16 * 4 + 8 * 4
    assert binary.binary_parameters == 16 * 4 * 9 and binary.fp_parameters == 16 + 8
    assert state_sizes(model, word_bits=32)["0.weight"].bytes == 16 * 4 * 2 + 16 * 4 + 32  # one 32-bit word a row


def test_a_full_precision_operand_makes_the_macs_flops() -> None:
    model = _small()
    set_binarization(model, weights=True, activations=False)
    binary = measure_costs(model, torch.randn(1, 8, 10, 10))[0]
    assert (binary.weights, binary.inputs, binary.bops, binary.flops) == ("1-bit", "fp", 0, 14_400)
    set_binarization(model, weights=False, activations=False)
    cost = measure_costs(model, torch.randn(1, 8, 10, 10))[0]
    assert cost.weights == "fp" and cost.flops == 14_400 and cost.binary_parameters == 0
    assert cost.bytes == (16 * 4 * 9 + 16 + 8) * 4  # a full-precision weight is stored as it is


def test_a_hybrid_models_file_measures_what_the_report_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = didbq.build_model(MODEL, **ARGS)
    conversion = convert(model, conv_recipe(norm="batchnorm"))
    path = write_packed(trained(model, steps=1), tmp_path / "model.safetensors", model_name=MODEL, model_args=ARGS,
                        recipe=conversion.recipe)
    report = report_for_file(path)
    assert report.file.ok and report.file.payload_bytes == report.file.analytic_bytes
    assert report.flop_check.ok, report.flop_check  # the convolutions' MACs are torch's count
    convolutions = [layer for layer in report.plan.layers if layer.kind == "conv" and layer.weights == "1-bit"]
    assert convolutions and all(layer.binary and layer.bops == layer.macs > 0 for layer in convolutions)
    tensors = load_file(str(path))
    for layer in convolutions:
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(layer.name + "."))
        assert layer.bytes == stored, layer.name
    stems = [layer for layer in report.plan.layers if layer.name.startswith("stem.")]
    assert stems and all(layer.kind == "conv" and layer.flops == layer.macs for layer in stems)
