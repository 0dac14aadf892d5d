"""KeptKeys: what a binary attention matrix keeps of each query row (counted by hand on a known matrix), and how
often the output has the sign of the own value."""
from __future__ import annotations

import pytest
import torch

import didbq
from didbq.convert.walker import convert
from didbq.nn.attention import BinaryAttention
from didbq.train.evaluate import KeptKeys


def test_kept_keys_count_a_known_matrix() -> None:
    """threshold keeps A >= the row mean: [.5, .3, .1, .1] keeps two keys (mass .8), [.7, .1, .1, .1] one (.7)."""
    model = convert(didbq.build_model("test_vit"), "didb[probs=threshold]").model
    with KeptKeys(model) as kept:
        name, core = next(iter(kept.cores.items()))
        probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]).expand(1, core.heads, 2, 4)
        core.prob_binarizer.eval()(probs)
    assert kept.summary() == [{"layer": name, "keys": 4.0, "kept": 1.5, "kept_pct": 37.5,
                               "single_key_rows_pct": 50.0, "mass_kept_pct": pytest.approx(75.0),
                               "own_sign_pct": None}]  # the core itself did not run: no output to compare
    core.prob_binarizer(probs)
    assert kept.summary()[0]["kept"] == 1.5, "the hooks outlive the with block"


def test_kept_keys_cover_every_binary_core_and_skip_softmax() -> None:
    model = convert(didbq.build_model("test_vit"), "bit").model
    with KeptKeys(model) as kept:
        model.eval()(torch.randn(2, 3, 32, 32))
    layers = kept.summary()
    assert [layer["layer"] for layer in layers] == [f"blocks.{i}.attn.binary_core" for i in range(len(model.blocks))]
    assert all(1 <= layer["kept"] <= layer["keys"] and 0 < layer["mass_kept_pct"] <= 100 + 1e-3 for layer in layers)
    assert KeptKeys(convert(didbq.build_model("test_vit"), "didb[probs=softmax]").model).cores == {}


@pytest.mark.parametrize("shortcut, expected", [(1e4, 100.0), (-1e4, 0.0)])
def test_own_sign_follows_a_dominating_shortcut(shortcut: float, expected: float) -> None:
    """DIBA's s V outweighing A_b V: every output entry has the own value's sign (s > 0) or the opposite (s < 0)."""
    model = convert(didbq.build_model("test_vit"), "didb[aggregation=diba,differential=false,local=off]").model
    with torch.no_grad():
        for core in model.modules():
            if isinstance(core, BinaryAttention):
                core.shortcut.fill_(shortcut)
    with KeptKeys(model) as kept:
        model.eval()(torch.randn(2, 3, 32, 32))
    assert [layer["own_sign_pct"] for layer in kept.summary()] == [expected] * len(model.blocks)


def test_own_sign_of_plain_binary_attention_is_a_mix() -> None:
    model = convert(didbq.build_model("test_vit"), "bit").model
    with KeptKeys(model) as kept:
        model.eval()(torch.randn(4, 3, 32, 32))
    assert all(0.0 < layer["own_sign_pct"] < 100.0 for layer in kept.summary())
