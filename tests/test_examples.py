"""Every example under examples/ runs in its short form, so that none of them rots: the CI gate script passes a
tiny backbone end to end and fails with a clear message and exit code 1 when a gate fails, the GitHub workflow
is valid YAML that runs that script, examples/python_api.py trains, exports, loads and predicts, and
examples/custom_recipe.yaml (with the overrides its header shows) validates."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import didbq

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "ci" / "binarize_new_backbones.sh"
WORKFLOW = EXAMPLES / "ci" / "github-workflow.yml"
RECIPE = EXAMPLES / "custom_recipe.yaml"
BIN = Path(sys.executable).parent
# OMP_WAIT_POLICY: OpenMP threads that spin at barriers slow training 30-70x when another process (another test
# run, a study) shares the two cores; passive waiting costs nothing on an idle machine.
ENV = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "DIDBQ": str(BIN / "didbq") if (BIN / "didbq").exists() else f"{sys.executable} -m didbq",
       "PYTHON": sys.executable}
for _name in ("RECIPE", "MODEL_ARGS", "MIN_COMPRESSION", "MIN_OPS_REDUCTION", "DATA", "TRAIN_IMG_SIZE", "SHORT",
              "REPORT_DIR", "KEEP_WORK", "FAIL_FAST", "TEACHER_CHECKPOINT", "DEVICE", "COMPAT", "COMPAT_TIMEOUT"):
    ENV.pop(_name, None)  # the script's settings come from each test, not from the caller's shell
TINY = {"MODEL_ARGS": "-m img_size=32", "DEVICE": "cpu"}  # vit_tiny at 32x32: 8.8x smaller, 22.9x fewer OPs


def run_script(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def passing(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CI script on one tiny backbone in its quick form, its reports kept."""
    folder = tmp_path_factory.mktemp("ci")
    reports = folder / "reports"
    result = run_script("--quick", "vit_tiny_patch16_224", cwd=folder, REPORT_DIR=str(reports), **TINY)
    return {"result": result, "reports": reports, "folder": folder}


def test_ci_script_passes_a_tiny_backbone_end_to_end(passing: dict) -> None:
    result = passing["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for gate in ("compat: converts", "block linears: all 48 Linear layers inside blocks have 1-bit weights and 1-bit inputs",
                 "compression: 8.82x smaller", "OPs reduction: 22.90x fewer OPs", "packed file:", "FLOP count:"):
        assert f"PASS  {gate}" in out, out
    assert "didbq binarize vit_tiny_patch16_224" in out
    summary = re.search(r"^PASS  vit_tiny_patch16_224: 48 W1A1 block linears, 8\.8x smaller, 22\.9x fewer OPs; "
                        r"trained: [\d.]+ MB file at 32x32 \([\d.]+x smaller\), student top-1 [\d.]+%$", out, re.M)
    assert summary, out
    assert out.rstrip().endswith("all 1 backbone(s) passed")
    reports = passing["reports"]
    assert sorted(p.name for p in reports.iterdir()) == ["summary.txt", "vit_tiny_patch16_224.compat.json",
                                                         "vit_tiny_patch16_224.plan.json",
                                                         "vit_tiny_patch16_224.report.json"]
    compat = json.loads((reports / "vit_tiny_patch16_224.compat.json").read_text())["models"][0]
    assert compat["ok"] and compat["binary_layers"] == 48
    report = json.loads((reports / "vit_tiny_patch16_224.report.json").read_text())
    assert report["file"]["ok"] and report["input_size"] == [3, 32, 32] and "fully-binary" in report["results"]
    assert summary.group(0) in (reports / "summary.txt").read_text()
    assert not list(passing["folder"].glob("didbq-ci.*"))  # the temporary work folder is gone


def test_ci_script_fails_a_gate_with_a_clear_message(tmp_path: Path) -> None:
    result = run_script("--quick", "vit_tiny_patch16_224", cwd=tmp_path, MIN_COMPRESSION="1000", **TINY)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert ("FAIL  compression: 8.82x smaller than fp32 (2.58 MB packed vs 22.72 MB), minimum 1000x "
            "(MIN_COMPRESSION)") in out
    assert "PASS  OPs reduction" in out and "didbq binarize" not in out  # nothing trains after a failed gate
    assert "FAIL  vit_tiny_patch16_224: gate failed (compression)" in out
    assert "1 of 1 backbone(s) failed" in result.stderr


def test_ci_script_fails_a_block_linear_kept_in_full_precision(passing: dict, tmp_path: Path) -> None:
    """The plan of the passing run with one MLP linear left full precision (as a recipe's ignore entry or a
    missing rule would), served by a stand-in didbq command."""
    plan = json.loads((passing["reports"] / "vit_tiny_patch16_224.plan.json").read_text())
    layer = next(layer for layer in plan["layers"] if layer["name"] == "blocks.3.mlp.fc2")
    layer.update(weights="fp", inputs="fp", binary=False)
    plan["full_precision"].append({"name": "blocks.3.mlp.fc2", "type": "Linear", "reason": "ignored by the recipe",
                                   "parameters": 147648})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    fake = tmp_path / "fake_didbq"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'plan.json'}\n")
    fake.chmod(0o755)
    result = run_script("vit_tiny_patch16_224", "another_vit", cwd=tmp_path, DIDBQ=str(fake), COMPAT="0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("FAIL  block linears: 1 of 48 Linear layers inside blocks are not binary (1-bit weights and inputs): "
            "blocks.3.mlp.fc2 (fp weights, fp inputs)") in result.stdout
    assert "FAIL  another_vit: gate failed (block linears)" in result.stdout  # every backbone is checked
    assert "2 of 2 backbone(s) failed" in result.stderr


def test_ci_script_stops_a_backbone_that_fails_the_compat_check(tmp_path: Path) -> None:
    """`didbq compat`'s verdict on a backbone whose training step fails, served by a stand-in didbq command:
    nothing else runs for it."""
    verdict = {"models": [{"model": "some_vit", "ok": False, "stage": "train",
                           "reason": "blocks.0.mlp.fc1: non-finite gradient on its latent weight"}]}
    (tmp_path / "compat.json").write_text(json.dumps(verdict))
    fake = tmp_path / "fake_didbq"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'compat.json'}\nexit 1\n")
    fake.chmod(0o755)
    result = run_script("some_vit", cwd=tmp_path, DIDBQ=str(fake))
    assert result.returncode == 1, result.stdout + result.stderr
    line = "compat: stopped at train: blocks.0.mlp.fc1: non-finite gradient on its latent weight"
    assert f"FAIL  {line}" in result.stdout and f"FAIL  some_vit: {line}" in result.stdout
    assert "didbq plan" not in result.stdout


def test_ci_script_usage_errors_exit_2(tmp_path: Path) -> None:
    result = run_script(cwd=tmp_path)
    assert result.returncode == 2 and "name at least one timm backbone" in result.stderr
    result = run_script("test_vit", cwd=tmp_path, MODEL_ARGS="-m img_size")
    assert result.returncode == 2 and "MODEL_ARGS: 'img_size' is not key=value" in result.stderr
    result = run_script("test_vit", cwd=tmp_path, COMPAT="yes")
    assert result.returncode == 2 and "COMPAT must be 0 or 1" in result.stderr


def test_github_workflow_is_valid_and_runs_the_script() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"pull_request", "workflow_dispatch"} <= set(triggers)
    gate = workflow["jobs"]["gate"]
    assert gate["strategy"]["matrix"]["backbone"] and gate["needs"] == "backbones"
    runs = "\n".join(step.get("run", "") for step in gate["steps"])
    assert "bash examples/ci/binarize_new_backbones.sh" in runs and "-c constraints/cpu.txt" in runs
    assert SCRIPT.relative_to(ROOT).as_posix() in runs
    uploads = [step for step in gate["steps"] if step.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"].rstrip("/") == gate["env"]["REPORT_DIR"]
    assert set(workflow["env"]["DEFAULT_BACKBONES"].split()) == {"vit_small_patch16_224",
                                                                 "swin_tiny_patch4_window7_224"}


def test_python_api_example_runs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), "--short", "--out", str(tmp_path)],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("1. built", "2. converted with recipe 'didb'", "3. loaded Fashion-MNIST: 1000 training",
                 "4a. trained 20 steps", "4b. trained 20 steps fully binary", "5. wrote", "6. loaded with didbq.load",
                 "7. didbq.predict.predict on 4 PNG files"):
        assert step in out, out
    assert "largest logit difference to the trained model: 0)" in out  # the packed file is the trained model
    accuracy = re.search(r"^accuracy: ([\d.]+)% on 200 test images, (\d)/4 PNG files right", out, re.M)
    assert accuracy and 0 <= float(accuracy.group(1)) <= 100, out
    assert (tmp_path / "model.safetensors").exists() and len(list((tmp_path / "images").glob("*.png"))) == 4


def test_custom_recipe_validates_with_the_overrides_it_shows() -> None:
    result = subprocess.run([ENV["DIDBQ"], "plan", "test_vit", "--recipe", str(RECIPE.relative_to(ROOT)), "--json",
                             "--strict-rules"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["recipe"] == "custom_didb" and not plan["warnings"]
    rules = {swap["rule"] for swap in plan["replaced"]}
    assert rules == {"MLP output", "block linears", "MLP activation"}
    assert all(layer["binary"] for layer in plan["layers"] if layer["name"].startswith("blocks."))
    shown = re.findall(r"^#\s+(examples/custom_recipe\.yaml\[[^\]]*\])", RECIPE.read_text(), re.M)
    assert len(shown) >= 8 and any("linear.norm=batchnorm" in s for s in shown)
    for spec in shown:
        recipe = didbq.load_recipe(str(ROOT / spec))
        assert recipe.name == "custom_didb"
    assert didbq.load_recipe(f"{RECIPE}[stages=one]").stages[0].activations == "binary"
    assert didbq.load_recipe(f"{RECIPE}[steps=2]").stages[1].steps == 2
