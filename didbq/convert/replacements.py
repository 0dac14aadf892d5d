"""What a rule's `into` can name: each entry validates its options and builds the new module.

A builder receives the module being replaced and what the probe saw of it (the input shape of one image), so
that token-wise parameters can be sized without the recipe spelling out shapes. A replacement may keep some of
the modules its rule matches as they are (`keeps` says why, from the module and its input: binary_conv2d's
depthwise convolutions, the convolution that reads the image, gates on globally pooled maps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from didbq.nn.binarizers import ACTIVATION_BINARIZERS
from didbq.nn.conv import BinaryConv2d
from didbq.nn.linear import BinaryLinear
from didbq.nn.norms import ShiftedLayerScale, TokenBatchNorm
from didbq.nn.rprelu import ChannelRPReLU, RPReLU, TokenRPReLU
from didbq.registry import Registry


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RPReLUOptions(Options):
    slope_init: float = 0.25
    token_slope: bool = Field(False, description="token_rprelu only: a per-token factor on the slope")


ActName = Literal["none", "rprelu", "token_rprelu"]


class BinaryLinearOptions(Options):
    input_binarizer: str = Field("rsign", description="sign, rsign, bit_signed or identity (FP inputs)")

    @field_validator("input_binarizer")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in ACTIVATION_BINARIZERS:
            raise ValueError(f"unknown activation binarizer {name!r}; known: {', '.join(ACTIVATION_BINARIZERS)}")
        return name

    surrogate: Literal["approx_sign", "ste"] = "approx_sign"
    threshold_init: Literal["zero", "mean"] = Field(
        "zero", description="where the binarizer's learnable threshold starts (rsign, bit_signed): 0, or minus "
                            "the per-channel mean of the first training batch (inputs after a ReLU)")

    @field_validator("threshold_init")
    @classmethod
    def _threshold_learnable(cls, value: str, info: ValidationInfo) -> str:
        binarizer = info.data.get("input_binarizer")  # validated first (declared first); absent if it failed
        if value == "mean" and binarizer and not ACTIVATION_BINARIZERS[binarizer].learnable_threshold:
            raise ValueError(f"mean needs a binarizer with a learnable threshold (rsign, bit_signed), not "
                             f"{binarizer!r}")
        return value

    shortcut: bool = Field(False, description="y = act(norm(BinLinear(x)) + x), x repeated or group-averaged")
    norm: Literal["layernorm", "batchnorm", "none"] = Field(
        "none", description="norm of the binary product's output (batchnorm: over channels, the lineage's)")
    act: ActName = Field("none", description="activation after the layer")


class BinaryConv2dOptions(BinaryLinearOptions):
    shortcut: bool = Field(False, description="y = act(norm(BinConv(x)) + x) where the convolution keeps the "
                                              "shape (in = out channels, stride 1, size-preserving padding)")
    norm: Literal["batchnorm", "layernorm", "none"] = Field(
        "none", description="norm of the binary product's output over channels (BatchNorm2d or LayerNorm)")
    act: Literal["none", "rprelu"] = Field("none", description="per-channel RPReLU after the layer")
    depthwise: Literal["keep", "binary"] = Field(
        "keep", description="depthwise convolutions (groups = in_channels > 1) stay full precision, or binary")
    image_input: Literal["keep", "binary"] = Field(
        "keep", description="a convolution that reads the model's input image (a stem named otherwise, e.g. "
                            "ResNet's conv1) stays full precision, or binary")
    pooled: Literal["keep", "binary"] = Field(
        "keep", description="convolutions on 1x1 maps (squeeze-excitation and selective-kernel gates after global "
                            "pooling) stay full precision, or binary")


@dataclass(frozen=True)
class SeenInput:
    """What the conversion's probe saw of a module's first input."""

    shape: tuple[int, ...]  # of one forward's input (the example batch)
    device: torch.device
    dtype: torch.dtype
    is_model_input: bool = False  # the tensor the model itself was called with


def _never_kept(module: nn.Module, seen: SeenInput, options: Options) -> str | None:
    return None


@dataclass(frozen=True)
class Replacement:
    options: type[Options]
    build: Callable[[nn.Module, tuple[int, ...], Options], nn.Module]
    accepts: tuple[type[nn.Module], ...] = (nn.Module,)
    keeps: Callable[[nn.Module, SeenInput, Options], str | None] = _never_kept  # why a matched module stays as is


REPLACEMENTS: Registry[Replacement] = Registry("replacement")


def _activation(name: ActName, channels: int, token_shape: tuple[int, ...], options: RPReLUOptions) -> nn.Module | None:
    if name == "rprelu":
        return RPReLU(channels, options.slope_init)
    if name == "token_rprelu":
        return TokenRPReLU(channels, token_shape, options.slope_init, options.token_slope)
    return None


def _threshold_started(layer: BinaryLinear | BinaryConv2d, options: BinaryLinearOptions) -> nn.Module:
    if options.threshold_init == "mean":
        layer.input_binarizer.start_threshold_at_mean()
    return layer


def _build_binary_linear(module: nn.Module, shape: tuple[int, ...], options: BinaryLinearOptions) -> nn.Module:
    act = _activation(options.act, module.out_features, shape[1:-1], RPReLUOptions())
    return _threshold_started(BinaryLinear.from_linear(
        module, input_binarizer=options.input_binarizer, surrogate=options.surrogate, shortcut=options.shortcut,
        norm=options.norm, act=act), options)


def _conv_kept(module: nn.Module, seen: SeenInput, options: BinaryConv2dOptions) -> str | None:
    """Why a convolution stays full precision under the option that keeps it (each is on by default): a
    depthwise one holds few weights and little of the work; the one that reads the image gets 3 channels,
    too little to survive binary inputs (every binary network keeps its first layer); a gate on pooled 1x1 maps
    runs once per image, and its BatchNorm would see one value per image."""
    depthwise = module.groups > 1 and module.groups == module.in_channels
    pooled = len(seen.shape) == 4 and seen.shape[2:] == (1, 1)
    reasons = ((depthwise, options.depthwise, "depthwise convolution (binary_conv2d depthwise: keep)"),
               (seen.is_model_input, options.image_input, "reads the input image (binary_conv2d image_input: keep)"),
               (pooled, options.pooled, "gate on globally pooled 1x1 maps (binary_conv2d pooled: keep)"))
    return next((reason for applies, option, reason in reasons if applies and option == "keep"), None)


def _build_binary_conv2d(module: nn.Module, shape: tuple[int, ...], options: BinaryConv2dOptions) -> nn.Module:
    act = ChannelRPReLU(module.out_channels) if options.act == "rprelu" else None
    return _threshold_started(BinaryConv2d.from_conv(
        module, input_binarizer=options.input_binarizer, surrogate=options.surrogate, shortcut=options.shortcut,
        norm=options.norm, act=act), options)


def _build_rprelu(module: nn.Module, shape: tuple[int, ...], options: RPReLUOptions) -> nn.Module:
    return RPReLU(shape[-1], options.slope_init)


def _build_token_rprelu(module: nn.Module, shape: tuple[int, ...], options: RPReLUOptions) -> nn.Module:
    return TokenRPReLU(shape[-1], shape[1:-1], options.slope_init, options.token_slope)


def _build_identity(module: nn.Module, shape: tuple[int, ...], options: Options) -> nn.Module:
    return nn.Identity()


class LayerScaleOptions(Options):
    init: float = Field(0.1, description="initial alpha (the lineage's 0.1)")
    shift: bool = Field(True, description="the learnable shift `move` after the scale")


def _build_layer_scale(module: nn.Module, shape: tuple[int, ...], options: LayerScaleOptions) -> nn.Module:
    return ShiftedLayerScale(shape[-1], options.init, options.shift)


def _build_batchnorm(module: nn.Module, shape: tuple[int, ...], options: Options) -> nn.Module:
    return TokenBatchNorm(shape[-1])


REPLACEMENTS.register("binary_linear")(Replacement(BinaryLinearOptions, _build_binary_linear, (nn.Linear,)))
REPLACEMENTS.register("binary_conv2d")(Replacement(BinaryConv2dOptions, _build_binary_conv2d, (nn.Conv2d,),
                                                   _conv_kept))
REPLACEMENTS.register("rprelu")(Replacement(RPReLUOptions, _build_rprelu))
REPLACEMENTS.register("token_rprelu")(Replacement(RPReLUOptions, _build_token_rprelu))
REPLACEMENTS.register("identity")(Replacement(Options, _build_identity))
REPLACEMENTS.register("layer_scale")(Replacement(LayerScaleOptions, _build_layer_scale))
REPLACEMENTS.register("batchnorm")(Replacement(Options, _build_batchnorm, (nn.LayerNorm,)))

