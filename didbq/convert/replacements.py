"""What a rule's `into` can name: each entry validates its options and builds the new module.

A builder receives the module being replaced and what the probe saw of it (the input shape of one image), so
that token-wise parameters can be sized without the recipe spelling out shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from didbq.nn.binarizers import ACTIVATION_BINARIZERS
from didbq.nn.linear import BinaryLinear
from didbq.nn.norms import ShiftedLayerScale, TokenBatchNorm
from didbq.nn.rprelu import RPReLU, TokenRPReLU
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


@dataclass(frozen=True)
class Replacement:
    options: type[Options]
    build: Callable[[nn.Module, tuple[int, ...], Options], nn.Module]
    accepts: tuple[type[nn.Module], ...] = (nn.Module,)


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
REPLACEMENTS.register("rprelu")(Replacement(RPReLUOptions, _build_rprelu))
REPLACEMENTS.register("token_rprelu")(Replacement(RPReLUOptions, _build_token_rprelu))
REPLACEMENTS.register("identity")(Replacement(Options, _build_identity))
REPLACEMENTS.register("layer_scale")(Replacement(LayerScaleOptions, _build_layer_scale))
REPLACEMENTS.register("batchnorm")(Replacement(Options, _build_batchnorm, (nn.LayerNorm,)))

