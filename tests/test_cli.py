"""The command line: plan prints tables or JSON; bad input is one line on stderr with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run

from didbq.cli import main
from didbq.convert.recipe import PAPER_DIDB
from didbq.errors import DidbqError


def test_plan_json_has_the_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "test_vit", "--recipe", "xnor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "test_vit" and data["recipe"] == "xnor"
    assert data["totals"]["bops"] > 0 and data["totals"]["ops"] < data["totals"]["fp_reference_flops"]


def test_plan_table_shows_replacements_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "test_vit", "--recipe", PAPER_DIDB, "--layers"], capsys)
    assert code == 0
    for text in ("Replaced modules", "blocks.*.attn.qkv", "token_rprelu", "Full precision", "classifier head",
                 "BOPs", "blocks.0.attn.binary_core.q·kᵀ band 1"):
        assert text in out


def test_recipe_option_takes_a_variant_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    bops = {}
    for spec in ("didb[hfsc=separate]", "didb[hfsc=off]"):
        code, out, _ = run(["plan", "test_vit", "--recipe", spec, "--json"], capsys)
        assert code == 0
        bops[spec] = json.loads(out)["totals"]["bops"]
    assert bops["didb[hfsc=off]"] < bops["didb[hfsc=separate]"]  # HFSC's added projection and products


def test_model_args_reach_timm(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "test_vit", "-r", "xnor", "-m", "num_classes=10", "-m", "img_size=64", "--json"],
                       capsys)
    assert code == 0
    data = json.loads(out)
    assert data["input_size"] == [3, 64, 64]
    assert next(k for k in data["full_precision"] if k["name"] == "head")["parameters"] == 64 * 10 + 10


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


BAD_INPUT = [
    (["plan", "test_vit", "--recipe", "{recipe}"], "name: [oops\n", "malformed YAML"),
    (["plan", "test_vit", "--recipe", "{recipe}"], "name: x\nbinarise: {}\n", "binarise: unknown key"),
    (["plan", "test_vit", "--recipe", "{recipe}"], "name: x\nattention: {local_init: big}\n", "attention.local_init"),
    (["plan", "test_vit", "--recipe", "{recipe}", "--strict-rules"],
     "name: x\nbinarize:\n  rules: [{targets: [Conv3d], into: identity}]\n", "matches no module"),
    (["plan", "test_vit", "--recipe", "no-such-recipe"], None, "no such recipe file"),
    (["plan", "deit_smal_patch16_224"], None, "did you mean"),
]


@pytest.mark.parametrize("args, recipe, expected", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], recipe: str | None, expected: str,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if recipe is not None:
        args = [a.format(recipe=_recipe(tmp_path, recipe)) for a in args]
    code, out, err = run(args, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_unmatched_rule_warns_without_strict_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "name: x\nbinarize:\n  rules: [{targets: [Conv3d], into: identity}]\n")
    code, _, err = run(["plan", "test_vit", "--recipe", recipe], capsys)
    assert code == 0 and "warning: rule 'Conv3d' matches no module" in err


def test_debug_shows_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DidbqError):
        main(["--debug", "plan", "deit_smal_patch16_224"])


def test_console_script_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "didbq", "plan", "not_a_model_at_all"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("didbq: error: unknown timm model 'not_a_model_at_all'")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ report and export


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed test_vit (didb recipe, untrained) with stage results in its metadata."""
    import didbq
    from didbq.export import write_packed

    model = didbq.build_model("test_vit", num_classes=10)
    conversion = didbq.convert.convert(model, "didb")
    return write_packed(model.eval(), tmp_path_factory.mktemp("packed") / "model.safetensors",
                        model_name="test_vit", model_args={"num_classes": 10}, recipe=conversion.recipe,
                        extra={"results": {"s2": {"top1": 61.5, "top5": 95.25}}})


def test_report_of_a_model_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["report", "test_vit", "--recipe", "xnor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "analytic" and data["file"]["ok"] and data["flop_check"]["ok"]
    assert data["totals"]["bops"] > 0 and data["blocks"][-1]["name"] == "head"


def test_report_of_a_file_prints_tables_and_a_chart(packed_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["report", str(packed_file), "--plot", str(tmp_path / "r.png")], capsys)
    assert code == 0
    for text in ("Cost per layer", "blocks.0.attn.qkv", "Per block", "Full precision", "classifier head",
                 "tensors measured", "(+0.00%)", "torch.utils.flop_counter", "s2 top-1 / top-5", "61.50%"):
        assert text in out, text
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_run_folder_takes_no_recipe(packed_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["report", str(packed_file.parent), "--recipe", "xnor"], capsys)
    assert code == 2 and "go with MODEL" in err


@pytest.mark.parametrize("form, extra", [("float", []), ("packed", ["--fp16"]), ("packed", ["--word-bits", "32"])])
def test_export(form: str, extra: list[str], packed_file: Path, tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors import safe_open

    import didbq

    out = tmp_path / "out.safetensors"
    code, printed, err = run(["export", str(packed_file), "--format", form, "-o", str(out), *extra], capsys)
    assert code == 0, err
    assert f"wrote {out}" in printed
    with safe_open(str(out), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert json.loads(metadata["results"]) == {"s2": {"top1": 61.5, "top5": 95.25}}
    if form == "float":
        assert "blocks.0.attn.qkv.weight" in keys and not any(k.endswith("weight_packed") for k in keys)
        weight = safe_open(str(out), "pt").get_tensor("blocks.0.attn.qkv.weight")
        scale = weight.abs().amax(1, keepdim=True)
        assert torch.equal(weight.abs(), scale.expand_as(weight))  # each row is +-scale
        return
    original, exported = didbq.load(packed_file), didbq.load(out)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        if "--word-bits" in extra:
            assert torch.equal(original(x), exported(x))
        else:
            assert out.stat().st_size < packed_file.stat().st_size
    code, _, err = run(["export", str(packed_file), "-o", str(out)], capsys)
    assert code == 2 and "--force" in err


@pytest.mark.parametrize("case", ["truncated", "corrupted header", "tensor missing", "not safetensors", "pickle",
                                  "raw pickle", "older version"])
def test_report_and_export_refuse_bad_files_with_one_line_and_exit_code_2(
        case: str, packed_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from badfiles import BAD_FILES, bad_file

    path = bad_file(case, packed_file, tmp_path)
    for args in (["report", str(path)], ["export", str(path), "-o", str(tmp_path / "x.safetensors")]):
        code, out, err = run(args, capsys)
        assert code == 2, err
        assert BAD_FILES[case] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert out == ""
    assert not (tmp_path / "UNPICKLED").exists() and not (tmp_path / "x.safetensors").exists()


def test_report_of_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["report", "runs/no-such-run"], capsys)
    assert code == 2 and "no such file or run folder" in err


def test_plan_of_a_model_with_batch_norms_and_the_explicit_route(capsys: pytest.CaptureFixture[str]) -> None:
    """levit: BatchNorm1d in its head (one image in the measuring pass) and attention computed by hand."""
    code, out, err = run(["plan", "levit_128s", "--json"], capsys)
    assert code == 0, err
    assert {a["route"] for a in json.loads(out)["attention"]} == {"explicit"}
