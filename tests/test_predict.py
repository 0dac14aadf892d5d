"""`didbq predict` and what a loaded run carries: timm's own data config and transform reproduce the run's
evaluation preprocessing, and a briefly trained model classifies most real Fashion-MNIST images right."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import didbq
from didbq.cli import main
from didbq.convert.walker import convert
from didbq.export import write_packed
from didbq.nn import set_binarization
from didbq.train.data import TransformedImages, load_image_data, preprocessing, transform_spec_for

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 96, "num_heads": 3, "in_chans": 1, "num_classes": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model with binary weights trained 150 steps on 3,000 Fashion-MNIST images, packed with the run's
    preprocessing and labels, and 100 test images written as PNG files."""
    torch.manual_seed(0)
    data = load_image_data("fashion-mnist", train_limit=3000, test_limit=100)
    model = didbq.build_model(MODEL, **ARGS)
    conversion = convert(model, "quick")
    set_binarization(model, weights=True, activations=False)
    spec = transform_spec_for(model, augment="none")
    train = TransformedImages(data.train, data, spec, train=False)
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(150):
        batch = torch.randint(0, len(images), (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("predict")
    path = write_packed(model.eval(), folder / "model.safetensors", model_name=MODEL, model_args=ARGS,
                        recipe=conversion.recipe, extra={"class_names": data.class_names,
                                                         "preprocessing": preprocessing(spec)})
    pictures = folder / "images"
    pictures.mkdir()
    truth = {}
    for index, row in enumerate(data.test):
        name = pictures / f"{index:03d}.png"
        Image.fromarray(np.asarray(row["image"], dtype=np.uint8)).save(name)
        truth[str(name)] = data.class_names[row["label"]]
    return {"path": path, "folder": pictures, "truth": truth, "data": data, "spec": spec}


def test_a_loaded_run_carries_its_preprocessing_for_timm(trained: dict) -> None:
    from timm.data import create_transform, resolve_data_config

    model = didbq.load(trained["path"])
    config = resolve_data_config({}, model=model)
    spec = trained["spec"]
    assert config["input_size"] == (1, 28, 28) and config["mean"] == spec.mean and config["std"] == spec.std
    assert model.pretrained_cfg["num_classes"] == 10
    assert model.pretrained_cfg["label_names"] == trained["data"].class_names
    transform = create_transform(**config)
    reference = TransformedImages(trained["data"].test, trained["data"], spec, train=False)
    for index in range(5):
        image = Image.open(trained["folder"] / f"{index:03d}.png")
        assert torch.allclose(transform(image), reference[index][0], atol=1e-6)


def test_predict_names_the_right_class_for_most_images(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    main(["predict", str(trained["path"]), str(trained["folder"]), "--top-k", "3", "--json", "--batch", "16"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["predictions"]) == 100 and not result["unreadable"]
    right = sum(p["top"][0]["class"] == trained["truth"][p["image"]] for p in result["predictions"])
    assert right >= 60, right  # ten classes: chance is 10
    first = result["predictions"][0]["top"]
    assert len(first) == 3 and first[0]["probability"] >= first[1]["probability"] >= first[2]["probability"]


def test_unreadable_images_are_skipped_and_only_all_unreadable_fails(trained: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    main(["predict", str(trained["path"]), str(trained["folder"] / "000.png"), str(broken), "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [p["image"] for p in result["predictions"]] == [str(trained["folder"] / "000.png")]
    assert result["unreadable"][0]["image"] == str(broken) and f"skipped {broken}" in captured.err
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(trained["path"]), str(broken), str(tmp_path / "missing.png")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and error[-1] == "didbq: error: none of the 2 images could be read (see above)"
