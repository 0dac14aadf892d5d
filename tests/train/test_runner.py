"""`didbq binarize` end to end on real Fashion-MNIST images: outputs, falling loss, kill-and-resume, DDP, and
bad input. The model is a tiny ViT (28x28, patch 7) and each phase runs a handful of steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import didbq
from didbq.cli import main

TINY = """
name: tiny
model:
  args: {img_size: 28, patch_size: 7, depth: 2, embed_dim: 32, num_heads: 2, in_chans: 1}
binarize:
  rules:
    - {name: block linears, targets: [Linear], into: binary_linear, options: {shortcut: true, norm: layernorm}}
    - {targets: [GELU], into: token_rprelu}
  ignore:
    - {target: "re:^head$", reason: classifier head}
    - {target: "re:^patch_embed", reason: patch embedding}
attention: {variant: didb}
data: {batch_size: 32, eval_batch_size: 64, workers: 0, augment: light, train_limit: 256, test_limit: 64}
{teacher}
stages:
  - {name: s1, activations: fp, steps: 6, optimizer: {lr: 1.0e-3, scale_lr_with_batch: false}}
  - {name: s2, steps: 8, init_from: s1, optimizer: {lr: 1.0e-3, scale_lr_with_batch: false}}
run: {checkpoint_every: 2, log_every: 1}
"""
TEACHER_TRAINING = """teacher:
  pretrained: false
  train: {name: teacher, weights: fp, activations: fp, steps: 16,
          optimizer: {lr: 2.0e-3, scale_lr_with_batch: false}, loss: {kd_weight: 0, label_weight: 1}}"""
MODEL = "vit_tiny_patch16_224"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY.replace("{teacher}", TEACHER_TRAINING))
    return path


def _command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "didbq", "binarize", MODEL, "--recipe", str(recipe), "--data", "fashion-mnist",
            "--out", str(out), "--no-progress", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(recipe_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run that the other tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    subprocess.run(_command(recipe_file, out), check=True, env=ENV, capture_output=True, timeout=600)
    return out


def test_a_run_writes_its_folder_and_the_loss_falls(reference: Path) -> None:
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "curves.png", "teacher.safetensors",
                 "stages/s1.safetensors", "stages/s2.safetensors", "model.safetensors", "report.json", "results.json"):
        assert (reference / name).exists(), name
    assert not list(reference.rglob("*.tmp")), "a temporary file was left behind"
    assert didbq.load_recipe(reference / "recipe.yaml").name == "tiny"
    teacher = [m["loss"] for m in _metrics(reference) if m.get("phase") == "teacher" and "loss" in m]
    assert sum(teacher[-4:]) / 4 < sum(teacher[:4]) / 4, teacher
    results = json.loads((reference / "results.json").read_text())
    assert set(results) == {"teacher", "s1", "s2"}
    assert results["teacher"]["top1"] > 20  # ten classes: chance is 10%
    assert results["s1"]["epochs"] == 6 / (256 // 32) and all(results[p]["train_s"] > 0 for p in results)
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("runtime", ["packed", "reference"])
def test_eval_reproduces_the_final_accuracy(runtime: str, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["eval", str(reference), "--runtime", runtime, "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == json.loads((reference / "results.json").read_text())["s2"]["top1"]
    assert evaluated["runtime"].startswith(runtime)


def test_eval_measures_the_kept_keys(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--attention: per layer, the keys each of the 17 query rows keeps (16 patches and the class token)."""
    main(["eval", str(reference), "--attention", "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == json.loads((reference / "results.json").read_text())["s2"]["top1"]
    layers = evaluated["attention"]
    assert [layer["layer"] for layer in layers] == ["blocks.0.attn.binary_core", "blocks.1.attn.binary_core"]
    assert all(layer["keys"] == 17 and 1 <= layer["kept"] <= 17 for layer in layers), layers
    assert all(0 <= layer["own_sign_pct"] <= 100 for layer in layers), layers
    main(["eval", str(reference), "--attention"])
    table = capsys.readouterr().out
    assert "softmax mass kept" in table and "output sign = own value" in table
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(reference), "--attention", "--runtime", "packed"])
    assert exit_.value.code != 0 and "drop --runtime packed" in capsys.readouterr().err


def test_the_packed_model_is_the_trained_student(reference: Path) -> None:
    """didbq.load(run) gives bit-identical logits, on real test images, to the student as training left it (its
    latent weights in stages/s2.safetensors, binarized in forward), and report.json measured the file."""
    from didbq.convert.walker import convert
    from didbq.nn import set_binarization
    from didbq.train.checkpoint import load_weights
    from didbq.train.data import TransformedImages, load_image_data, transform_spec_for

    run = json.loads((reference / "run.json").read_text())
    latent = didbq.build_model(run["model_name"], **run["model_args"])
    convert(latent, didbq.load_recipe(reference / "recipe.yaml"))
    load_weights(reference / "stages" / "s2.safetensors", latent)
    set_binarization(latent, weights=True, activations=True)
    packed = didbq.load(reference)
    data = load_image_data("fashion-mnist", test_limit=64)
    test = TransformedImages(data.test, data, transform_spec_for(latent, augment="none"), train=False)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        assert torch.equal(packed(images), latent.eval()(images))
    report = json.loads((reference / "report.json").read_text())
    assert report["file"]["ok"] and report["flop_check"]["ok"] and set(report["results"]) == {"teacher", "s1", "s2"}
    assert report["file"]["file_bytes"] == (reference / "model.safetensors").stat().st_size
    assert report["totals"]["packed_bytes"] < report["totals"]["fp32_bytes"] / 3  # dim 32: mostly FP parts


def test_a_killed_run_resumes_to_bit_identical_weights(recipe_file: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    process = subprocess.Popen(_command(recipe_file, out), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill inside stage 2, after a mid-stage checkpoint
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if any('"phase": "s2", "step": 3' in line for line in lines):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["phase"] == 2 and 0 < checkpoint["step"] < 8, "the kill did not land inside stage 2"
    subprocess.run([sys.executable, "-m", "didbq", "binarize", "--resume", str(out), "--no-progress"], check=True,
                   env=ENV, capture_output=True, timeout=600)
    for name in ("stages/s2.safetensors", "model.safetensors"):  # latent weights, and the packed model
        expected, actual = load_file(str(reference / name)), load_file(str(out / name))
        assert expected.keys() == actual.keys()
        different = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert not different, (name, different)
    assert [m["loss"] for m in _metrics(out) if "loss" in m] == [m["loss"] for m in _metrics(reference) if "loss" in m]


def test_two_process_ddp_matches_the_single_process_run(recipe_file: Path, reference: Path, tmp_path: Path) -> None:
    """Same global batch split over two gloo ranks. Tolerance: every logged loss within 3% of the single-process
    run (the ranks' gradient all-reduce changes float summation order, and Adam's normalisation turns that into
    visible differences for near-zero gradients), and the same final accuracy within 5 points."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
               "-m", "didbq", *_command(recipe_file, out)[3:]]
    subprocess.run(command, check=True, env=ENV, capture_output=True, timeout=600)
    single = [m for m in _metrics(reference) if "loss" in m]
    parallel = [m for m in _metrics(out) if "loss" in m]
    assert [(m["phase"], m["step"]) for m in single] == [(m["phase"], m["step"]) for m in parallel]
    for one, two in zip(single, parallel):
        assert two["loss"] == pytest.approx(one["loss"], rel=0.03), (one, two)
    first = json.loads((reference / "results.json").read_text())["s2"]["top1"]
    assert json.loads((out / "results.json").read_text())["s2"]["top1"] == pytest.approx(first, abs=5)


def test_gradient_checkpointing_trains_the_same_student(reference: Path, tmp_path: Path) -> None:
    """run.grad_checkpointing: true, from the reference run's teacher: stage s1 logs the reference's losses."""
    recipe = tmp_path / "checkpointed.yaml"
    recipe.write_text(TINY.replace("{teacher}", "teacher: {pretrained: false}").replace(
        "run: {checkpoint_every: 2, log_every: 1}", "run: {checkpoint_every: 2, log_every: 1, grad_checkpointing: true}"))
    out = tmp_path / "checkpointed"
    done = subprocess.run(_command(recipe, out, "--teacher-checkpoint", str(reference / "teacher.safetensors")),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "gradient checkpointing: on (run.grad_checkpointing: True, input 28x28)" in done.stdout + done.stderr
    losses = {(m["phase"], m["step"]): m["loss"] for m in _metrics(out) if "loss" in m}
    expected = {(m["phase"], m["step"]): m["loss"] for m in _metrics(reference) if m.get("phase") == "s1" and "loss" in m}
    assert expected and {key: losses[key] for key in expected} == pytest.approx(expected, rel=1e-5)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, capsys.readouterr().err


def test_output_folder_is_never_overwritten_without_force(recipe_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["binarize", MODEL, "-r", str(recipe_file), "-d", "digits", "-o", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    assert "--resume" not in err  # nothing there to resume: do not suggest it
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_bytes(b"")
    code, err = run_cli(["binarize", MODEL, "-r", str(recipe_file), "-d", "digits", "-o", str(out)], capsys)
    assert code == 2 and f"--resume {out} to continue" in err  # the option with its folder, as it must be typed


def _tiny_teacher(path: Path, classes: int) -> None:
    model = didbq.build_model(MODEL, img_size=28, patch_size=7, depth=2, embed_dim=32, num_heads=2, in_chans=1,
                              num_classes=classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _no_teacher_training(tmp_path: Path) -> Path:
    path = tmp_path / "no_teacher_train.yaml"
    path.write_text(TINY.replace("{teacher}", "teacher: {pretrained: false}"))
    return path


@pytest.mark.parametrize("case", ["unknown dataset", "hub name offline", "missing label column",
                                  "wrong number of classes", "unreadable checkpoint", "pickle checkpoint",
                                  "nothing to resume"])
def test_bad_input_is_one_line_and_exit_code_2(case: str, recipe_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["binarize", MODEL, "-r", str(recipe_file), "-o", str(out), "--no-progress"]
    expected = {"unknown dataset": "not-a-dataset-xyz", "hub name offline": "not available offline",
                "missing label column": "label", "wrong number of classes": "does not fit",
                "unreadable checkpoint": "cannot read weights", "pickle checkpoint": "cannot read weights",
                "nothing to resume": "not a didbq run folder"}[case]
    if case == "unknown dataset":
        args += ["-d", "not-a-dataset-xyz"]
    elif case == "hub name offline":
        args += ["-d", "cifar100"]
    elif case == "missing label column":
        import datasets

        datasets.Dataset.from_dict({"image": [[[0] * 28] * 28] * 4}).to_parquet(str(tmp_path / "x.parquet"))
        args += ["-d", str(tmp_path / "x.parquet")]
    elif case == "wrong number of classes":
        _tiny_teacher(tmp_path / "teacher.safetensors", classes=5)
        args = ["binarize", MODEL, "-r", str(_no_teacher_training(tmp_path)), "-o", str(out), "-d",
                "fashion-mnist", "--teacher-checkpoint", str(tmp_path / "teacher.safetensors")]
    elif case == "unreadable checkpoint":
        (tmp_path / "teacher.safetensors").write_bytes(b"\x00garbage" * 10)
        args += ["-d", "digits", "--teacher-checkpoint", str(tmp_path / "teacher.safetensors")]
    elif case == "pickle checkpoint":
        torch.save({"model": print}, tmp_path / "teacher.pt")
        args += ["-d", "digits", "--teacher-checkpoint", str(tmp_path / "teacher.pt")]
    else:
        args = ["binarize", "--resume", str(tmp_path)]
    capsys.readouterr()  # drop what the set-up printed
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(p for p in out.rglob("*") if p.is_file()), "something was half-written"
