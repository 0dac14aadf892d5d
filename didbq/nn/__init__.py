"""Binary building blocks: binarizers, BinaryLinear, BinaryConv2d, RPReLU, the Haar split and the attention cores."""
from __future__ import annotations

from torch import nn

from didbq.nn.attention import ATTENTION_VARIANTS, AttentionOptions, BinaryAttention, ProbabilityBinarizer
from didbq.nn.binarizers import ACTIVATION_BINARIZERS, ActivationBinarizer, binarize_weight, hard_sign
from didbq.nn.binary import BinaryLayer
from didbq.nn.conv import BinaryConv2d
from didbq.nn.haar import TokenLayout, haar_bands, local_difference, split_tokens_into_bands
from didbq.nn.linear import BinaryLinear
from didbq.nn.rprelu import ChannelRPReLU, RPReLU, TokenRPReLU

__all__ = [
    "ACTIVATION_BINARIZERS", "ATTENTION_VARIANTS", "ActivationBinarizer", "AttentionOptions", "BinaryAttention",
    "BinaryConv2d", "BinaryLayer", "BinaryLinear", "ChannelRPReLU", "ProbabilityBinarizer", "RPReLU", "TokenLayout",
    "TokenRPReLU", "binarize_weight", "haar_bands", "hard_sign", "local_difference", "set_binarization",
    "split_tokens_into_bands",
]


def set_binarization(model: nn.Module, weights: bool = True, activations: bool = True) -> nn.Module:
    """Switch every binary layer (BinaryLinear, BinaryConv2d) and activation binarizer of `model` between binary
    and full-precision mode (two-stage training)."""
    for module in model.modules():
        if isinstance(module, BinaryLayer):
            module.binarize_weights = weights
        elif isinstance(module, ActivationBinarizer):
            module.enabled = activations
    return model
