"""The command line: plan prints tables or JSON; bad input is one line on stderr with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from didbq.cli import main
from didbq.errors import DidbqError


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_json_has_the_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "test_vit", "--recipe", "xnor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "test_vit" and data["recipe"] == "xnor"
    assert data["totals"]["bops"] > 0 and data["totals"]["ops"] < data["totals"]["fp_reference_flops"]


def test_plan_table_shows_replacements_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "test_vit", "--recipe", "recipes/didb.yaml", "--layers"], capsys)
    assert code == 0
    for text in ("Replaced modules", "blocks.*.attn.qkv", "token_rprelu", "Full precision", "classifier head",
                 "BOPs", "blocks.0.attn.binary_core.q·kᵀ band 1"):
        assert text in out


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
    (["plan", "levit_128s"], None, "attention class timm.models.levit.Attention is not supported"),
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
