"""The brief's own commands, as a new user types them: `didbq binarize deit_small --recipe recipes/didb.yaml`
resolves the short name, makes runs/<model>-<recipe>, and offline stops at the recipe's hub dataset with one
line; with --data digits and a tiny budget it completes, and `didbq report` alone reports that run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

import didbq
from didbq.convert.models import resolve_model_name
from didbq.errors import UnsupportedModelError
from didbq.train.run_folder import new_run_folder, newest_run

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "didb.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = "[model.img_size=32,data.train_limit=32,data.test_limit=16,data.batch_size=8,data.workers=0,steps=2]"


def didbq_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "didbq", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("short, canonical", [("deit_small", "deit_small_patch16_224"),
                                              ("vit_small", "vit_small_patch16_224"),
                                              ("swin_tiny", "swin_tiny_patch4_window7_224"),
                                              ("deit_small.fb_in1k", "deit_small_patch16_224.fb_in1k"),
                                              ("vit_tiny_patch16_224", "vit_tiny_patch16_224")])
def test_short_names_resolve_to_timms_default(short: str, canonical: str) -> None:
    assert resolve_model_name(short) == canonical


def test_names_without_a_clear_default_or_unknown_are_one_line() -> None:
    with pytest.raises(UnsupportedModelError, match="no clear default.*pvt_v2_b0, pvt_v2_b1"):
        resolve_model_name("pvt_v2")
    with pytest.raises(UnsupportedModelError) as error:
        resolve_model_name("deit_smal")
    assert "did you mean deit_small_patch16_224" in str(error.value) and "\n" not in str(error.value)


def test_run_folders_are_numbered_and_never_reused(tmp_path: Path) -> None:
    first = new_run_folder("m", "r", tmp_path)
    assert first == tmp_path / "m-r"
    first.mkdir()
    assert new_run_folder("m", "r", tmp_path) == first  # empty: nothing to overwrite
    (first / "run.json").write_text("{}")
    assert new_run_folder("m", "r", tmp_path) == tmp_path / "m-r-2"
    assert newest_run(tmp_path) == first
    with pytest.raises(didbq.errors.DidbqError, match="no run folder"):
        newest_run(tmp_path / "nothing")


def test_the_briefs_command_offline_stops_at_the_data_with_one_line(tmp_path: Path) -> None:
    done = didbq_cli("binarize", "deit_small", "--recipe", str(RECIPE), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "deit_small -> deit_small_patch16_224 (timm's default for the name)"
    assert lines[1] == "output: runs/deit_small_patch16_224-didb"
    assert lines[2].startswith("didbq: error: dataset 'uoft-cs/cifar100' is not available offline")
    assert "--data fashion-mnist" in lines[2] and len(lines) == 3 and "Traceback" not in done.stderr
    assert (tmp_path / "runs" / "deit_small_patch16_224-didb").is_dir()


def test_the_briefs_command_completes_on_digits_and_report_finds_it(tmp_path: Path) -> None:
    teacher = didbq.build_model("deit_small_patch16_224", img_size=32, num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    done = didbq_cli("binarize", "deit_small", "--recipe", f"{RECIPE}{TINY}", "--data", "digits",
                     "--teacher-checkpoint", str(tmp_path / "teacher.safetensors"), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: the teacher's top-1" in done.stderr and "better --teacher-checkpoint" in done.stderr  # untrained
    run = tmp_path / "runs" / "deit_small_patch16_224-didb"
    assert json.loads((run / "run.json").read_text())["model_name"] == "deit_small_patch16_224"
    report = didbq_cli("report", "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "reporting runs/deit_small_patch16_224-didb (the newest run under ./runs)" in report.stderr
    assert json.loads(report.stdout)["file"]["path"].endswith("model.safetensors")


def test_a_binary_recipe_or_study_file_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\x80\x81\x00\xffbinary")
    for args in (["plan", "test_vit", "--recipe", str(binary)], ["study", str(binary), "--out", str(tmp_path / "o")]):
        done = didbq_cli(*args, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip() == (f"didbq: error: {binary}: not a text (UTF-8) file: byte 0 is 0x80; a "
                                       f"{args[0] if args[0] == 'study' else 'recipe'} is YAML (see "
                                       f"{'studies/ci.yaml' if args[0] == 'study' else 'recipes/didb.yaml'})")
