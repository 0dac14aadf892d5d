"""The Hub layout: `didbq export --format hub` writes a folder that didbq.load reads back to identical logits,
with a timm-style config and a model card holding the measured numbers; offline, push and hf-hub: loads fail at
once with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import didbq
from didbq.cli import main
from didbq.convert.walker import convert
from didbq.export import write_packed
from didbq.train.data import load_image_data, preprocessing, transform_spec_for

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2, "in_chans": 1, "num_classes": 10}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = didbq.build_model(MODEL, **ARGS)
    conversion = convert(model, "didb")
    data = load_image_data("fashion-mnist", train_limit=16, test_limit=16)
    results = {"teacher": {"top1": 81.25, "top5": 99.0}, "fully-binary": {"top1": 77.5, "top5": 98.75}}
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    return write_packed(model.eval(), path, model_name=MODEL, model_args=ARGS, recipe=conversion.recipe,
                        extra={"class_names": data.class_names, "results": results, "data": "fashion-mnist",
                               "preprocessing": preprocessing(transform_spec_for(model, augment="none"))})


def test_a_hub_folder_round_trips_to_identical_logits(packed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "hub"
    main(["export", str(packed), "--format", "hub", "-o", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(didbq.load(folder)(x), didbq.load(packed)(x))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == MODEL and config["num_classes"] == 10 and config["model_args"] == ARGS
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28] and len(config["label_names"]) == 10
    assert config["didbq"]["recipe"] == "didb"


def test_the_model_card_holds_the_measured_numbers(packed: Path, tmp_path: Path) -> None:
    from didbq.export.hub import export_hub
    from didbq.report import report_for_file

    card = (export_hub(packed, tmp_path / "hub", repo_id="my-org/vit-fmnist-binary") / "README.md").read_text()
    totals = report_for_file(packed).as_dict()["totals"]
    assert f"{totals['compression']:.1f}x smaller packed" in card and f"{totals['bops']:,}" in card
    assert "| fully-binary | 77.50 | 98.75 |" in card and "didbq.load('hf-hub:my-org/vit-fmnist-binary')" in card
    assert "name: didb" in card  # the recipe
    with pytest.raises(didbq.errors.DidbqError, match="exists; pass --force"):
        export_hub(packed, tmp_path / "hub")


def test_offline_push_and_hub_load_fail_at_once_with_one_line(packed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for args in (["push", str(packed), "my-org/vit-fmnist-binary"],
                 ["predict", "hf-hub:my-org/vit-fmnist-binary", str(packed)]):
        done = subprocess.run([sys.executable, "-m", "didbq", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in done.stderr
