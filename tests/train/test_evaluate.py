"""KeptKeys: what a binary attention matrix keeps of each query row, counted by hand on a known matrix."""
from __future__ import annotations

import pytest
import torch

import didbq
from didbq.convert.walker import convert
from didbq.train.evaluate import KeptKeys


def test_kept_keys_count_a_known_matrix() -> None:
    """threshold keeps A >= the row mean: [.5, .3, .1, .1] keeps two keys (mass .8), [.7, .1, .1, .1] one (.7)."""
    model = convert(didbq.build_model("test_vit"), "didb[probs=threshold]").model
    with KeptKeys(model) as kept:
        name, core = next(iter(kept.cores.items()))
        probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]).expand(1, core.heads, 2, 4)
        core.prob_binarizer.eval()(probs)
    assert kept.summary() == [{"layer": name, "keys": 4.0, "kept": 1.5, "kept_pct": 37.5,
                               "single_key_rows_pct": 50.0, "mass_kept_pct": pytest.approx(75.0)}]
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
