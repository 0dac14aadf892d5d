"""What a rule's `into` can name: each entry validates its options and builds the new module.

A builder receives the module being replaced and what the probe saw of it (the input shape of one image), so
that token-wise parameters can be sized without the recipe spelling out shapes. A replacement may keep some of
the modules its rule matches as they are (`keeps` says why, e.g. binary_conv2d's depthwise convolutions): its
builder then returns the module itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
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


def _never_kept(module: nn.Module, options: Options) -> str | None:
    return None


@dataclass(frozen=True)
class Replacement:
    options: type[Options]
    build: Callable[[nn.Module, tuple[int, ...], Options], nn.Module]
    accepts: tuple[type[nn.Module], ...] = (nn.Module,)
    keeps: Callable[[nn.Module, Options], str | None] = _never_kept  # why a matched module stays as it is


REPLACEMENTS: Registry[Replacement] = Registry("replacement")


def _activation(name: ActName, channels: int, token_shape: tuple[int, ...], options: RPReLUOptions) -> nn.Module | None:
    if name == "rprelu":
        return RPReLU(channels, options.slope_init)
    if name == "token_rprelu":
        return TokenRPReLU(channels, token_shape, options.slope_init, options.token_slope)
    return None


def _build_binary_linear(module: nn.Module, shape: tuple[int, ...], options: BinaryLinearOptions) -> nn.Module:
    act = _activation(options.act, module.out_features, shape[1:-1], RPReLUOptions())
    return BinaryLinear.from_linear(module, input_binarizer=options.input_binarizer, surrogate=options.surrogate,
                                    shortcut=options.shortcut, norm=options.norm, act=act)


def _conv_kept(module: nn.Module, options: BinaryConv2dOptions) -> str | None:
    """Why a depthwise convolution stays full precision under `depthwise: keep` (the default): it holds few
    weights and little of the work, so keeping it costs little."""
    depthwise = module.groups > 1 and module.groups == module.in_channels
    return "depthwise convolution (binary_conv2d depthwise: keep)" if depthwise and options.depthwise == "keep" else None


def _build_binary_conv2d(module: nn.Module, shape: tuple[int, ...], options: BinaryConv2dOptions) -> nn.Module:
    if _conv_kept(module, options):
        return module
    act = ChannelRPReLU(module.out_channels) if options.act == "rprelu" else None
    return BinaryConv2d.from_conv(module, input_binarizer=options.input_binarizer, surrogate=options.surrogate,
                                  shortcut=options.shortcut, norm=options.norm, act=act)


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

