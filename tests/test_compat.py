"""didbq compat: the library on timm's tiny test models (in this process, and once in child processes), the
stage a failure is reported at, the CLI's JSON, table, markdown and exit codes (0 / 1 / 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import run

from didbq.compat import (
    CompatReport,
    CompatResult,
    architectures_with_attention,
    check_model,
    compat_markdown,
    family_of,
    note_of,
    run_compat,
    select_models,
)
from didbq.errors import DidbqError

# Rules that cannot convert: binary_linear replaces only Linear (a recipe error naming the class at convert time).
BAD_RULE = "name: bad\nbinarize:\n  rules: [{targets: [LayerNorm], into: binary_linear}]\n"
# Converts and trains, but its last stage keeps the weights full precision: not binary.
FP_STAGE = ("name: fp-weights\nbinarize:\n  rules: [{targets: [Linear], into: binary_linear}]\n"
            "stages: [{name: s, weights: fp, activations: binary, steps: 1}]\n")


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_small_vits_convert_train_and_stay_binary() -> None:
    report = run_compat(["test_vit", "test_vit2"], isolate=False)
    assert report.ok and [r.model for r in report.results] == ["test_vit", "test_vit2"]
    for result in report.results:
        assert result.converts and result.trains and result.binary and result.stage is None and result.reason is None
        assert result.family == "vision_transformer" and result.parameters > 0 and result.binary_layers > 0
        assert 0 < result.convert_seconds < result.seconds
        assert [a["route"] for a in result.attention] == ["sdpa"] and result.kept_attention == []
    assert report.results[0].attention[0]["modules"] == 6  # test_vit: one attention core per block
    assert report.families()["vision_transformer"]["ok"] == 2
    assert report.total()["fraction"] == 1.0 and report.vit_total()["checked"] == 2


def test_gradient_checkpointing_follows_the_recipe_and_is_noted() -> None:
    default = check_model("test_vit")  # 160 px: under auto's 512x512
    forced = check_model("test_vit", "didb[run.grad_checkpointing=true]")
    assert default.ok and forced.ok
    assert not default.grad_checkpointing and forced.grad_checkpointing
    assert note_of(default) == "" and "gradient checkpointing" in note_of(forced)


def test_a_model_that_does_not_convert_names_the_class(tmp_path: Path) -> None:
    result = check_model("test_vit", _recipe(tmp_path, BAD_RULE))
    assert not result.converts and not result.trains and not result.binary and not result.ok
    assert result.stage == "convert" and "LayerNorm" in result.reason and "\n" not in result.reason


def test_full_precision_weights_after_the_step_are_not_binary(tmp_path: Path) -> None:
    result = check_model("test_vit", _recipe(tmp_path, FP_STAGE))
    assert result.converts and result.trains and not result.binary
    assert result.stage == "binary" and "full-precision weights after the training step" in result.reason


def test_a_failing_training_step_is_the_train_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    import didbq.compat

    def no_gradient(*args: object) -> None:
        raise DidbqError("blocks.0.attn.qkv: no gradient reaches its latent weight")

    monkeypatch.setattr(didbq.compat, "_train_step", no_gradient)
    result = check_model("test_vit")
    assert result.converts and not result.trains and not result.binary
    assert (result.stage, result.reason) == ("train", "blocks.0.attn.qkv: no gradient reaches its latent weight")


def test_child_processes_and_the_timeout() -> None:
    report = run_compat(["test_vit"], per_process=2)
    assert report.ok and report.results[0].attention[0]["modules"] == 6
    report = run_compat(["test_vit2"], timeout=0.05)  # the child is still importing timm
    result = report.results[0]
    assert not report.ok and result.stage == "timeout" and result.reason.startswith("timeout")
    assert result.family == "vision_transformer"


def test_max_params_skips_with_the_reason() -> None:
    report = run_compat(["test_vit"], isolate=False, max_params=1e5)
    result = report.results[0]
    assert result.skipped and result.parameters == 371_240 and "> max_params" in result.reason
    assert report.ok and report.total() == {**report.total(), "models": 1, "checked": 0, "skipped": 1}


def test_choosing_models() -> None:
    assert select_models(["test_vit?", "test_vit"]) == ["test_vit2", "test_vit3", "test_vit4", "test_vit"]
    assert select_models(["deit_small"]) == ["deit_small_patch16_224"]  # short names resolve as elsewhere
    with pytest.raises(DidbqError, match=r"pattern 'no_such_\*' matches no timm model"):
        select_models(["test_vit", "no_such_*"])
    with pytest.raises(DidbqError, match="or give --all"):
        select_models([])
    assert architectures_with_attention(names=["test_vit", "test_resnet", "test_convnext"]) == ["test_vit"]
    assert select_models(["test_resnet", "test_vit"], all_architectures=True) == ["test_vit"]
    assert [family_of(n) for n in ("levit_128s", "deit3_small_patch16_224", "test_vit", "swinv2_cr_tiny_ns_224")] \
        == ["levit", "deit", "vision_transformer", "swin_transformer_v2_cr"]


def test_a_near_miss_does_not_round_to_100_percent() -> None:
    passing = CompatResult("vit_a", "vision_transformer", 1, True, True, True)
    failing = CompatResult("vit_b", "vision_transformer", 1, True, False, False, stage="train", reason="x")
    report = CompatReport([passing] * 250 + [failing], "didb", "1", "2", "cpu", "today", 1.0)
    assert "ViT families: 250 of 251 (99.6%)." in compat_markdown(report)


def test_markdown() -> None:
    results = [CompatResult("vit_a", "vision_transformer", 22_000_000, True, True, True, seconds=3.0,
                            convert_seconds=0.6, binary_layers=48,
                            attention=[{"family": "vision_transformer/deit/deit3", "route": "sdpa", "modules": 12}]),
               CompatResult("odd_b", "odd", 5_000_000, True, False, False, stage="train", reason="x | y", seconds=1.0,
                            kept_attention=[{"name": "a", "type": "Gate", "reason": "a gate: full precision"}]),
               CompatResult("big_c", "odd", 900_000_000, stage="skipped", reason="too big")]
    report = CompatReport(results, "didb", "1.0.99", "2.9.0", "cpu", "2026-01-02 03:04 UTC", 75.0)
    text = compat_markdown(report)
    for expected in ("recipe `didb`", "timm 1.0.99, torch 2.9.0, device cpu, 2026-01-02 03:04 UTC, run time 75 s; the checks took 4 s",
                     "Overall: 1 of 2 checked models pass (50%), 1 skipped. ViT families: 1 of 1 (100%).",
                     "| **vision_transformer** | 1 | 1 | 1 | 1 | 1 | 1 (100%) | 0 |",
                     "| odd | 2 | 1 | 1 | 0 | 0 | 0 (0%) | 1 |",
                     "| total | 3 | 2 | 2 | 1 | 1 | 1 (50%) | 1 |",
                     "| vit_a | vision_transformer | 22.0 | yes | yes | yes | 3.0 | 0.60 | 12 sdpa "
                     "(vision_transformer/deit/deit3) |  |  |",
                     "| odd_b | odd | 5.0 | yes | **no** | **no** | 1.0 | - |  | 1 Gate: a gate: full precision | x \\| y |",
                     "| big_c | odd | 900.0 | - | - | - |"):
        assert expected in text, expected
    assert not report.ok and report.as_dict()["families"]["odd"]["skipped"] == 1


def test_cli_json_table_markdown_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compat", "test_vit", "--in-process", "--json", "--markdown", str(tmp_path / "c.md")],
                         capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"timm", "torch", "recipe", "date", "seconds", "check_seconds", "ok", "total", "vit_families", "families",
                         "models"}
    assert data["ok"] and data["recipe"] == "didb" and data["total"]["ok"] == 1
    model = data["models"][0]
    assert {k: model[k] for k in ("model", "family", "converts", "trains", "binary", "reason")} == {
        "model": "test_vit", "family": "vision_transformer", "converts": True, "trains": True, "binary": True,
        "reason": None}
    assert model["convert_seconds"] > 0 and model["attention"][0]["modules"] == 6
    assert "| test_vit | vision_transformer |" in (tmp_path / "c.md").read_text()

    code, out, _ = run(["compat", "test_vit", "--in-process", "--recipe", _recipe(tmp_path, BAD_RULE)], capsys)
    assert code == 1
    for text in ("test_vit", "no", "LayerNorm", "Per family", "vision_transformer", "ViT families", "total"):
        assert text in out, text


@pytest.mark.parametrize("args, expected", [
    (["compat", "test_vit", "no_such_model_*"], "pattern 'no_such_model_*' matches no timm model"),
    (["compat"], "or give --all"),
    (["compat", "test_vit", "--recipe", "no-such-recipe"], "no such recipe file"),
])
def test_cli_usage_errors_exit_2(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2 and expected in err and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_record_file_resumes_a_stopped_matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "matrix.jsonl"
    first = run_compat(["test_vit"], isolate=False, record=record)
    assert [json.loads(line)["model"] for line in record.read_text().splitlines()] == ["test_vit"]
    checked: list[str] = []
    original = check_model

    def counting(name: str, *args: object, **kwargs: object) -> CompatResult:
        checked.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr("didbq.compat.check_model", counting)
    again = run_compat(["test_vit", "test_vit2"], isolate=False, record=record)
    assert checked == ["test_vit2"]  # test_vit came from the record
    assert again.results[0].as_dict() == first.results[0].as_dict() and again.ok
    assert len(record.read_text().splitlines()) == 2
