"""`didbq study` end to end on the CI study (studies/ci.yaml: scikit-learn digits, a tiny ViT, a few dozen steps
per run): every recipe trains and beats chance, the table is written, a second invocation trains nothing, a
stopped run is resumed, and bad study files are one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from didbq.cli import main
from didbq.errors import DidbqError
from didbq.export.loader import export
from didbq.study import TABLE_JSON, TABLE_MARKDOWN, load_study, run_study

STUDY = Path(__file__).resolve().parent.parent / "studies" / "ci.yaml"
RUNS = ["teacher", "xnor-seed0", "reactnet-seed0", "bit-seed0", "didb-seed0", "didb-seed1",
        "didb-paper-seed0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """The CI study run once through the library."""
    out = tmp_path_factory.mktemp("study") / "ci"
    lines: list[str] = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        table = run_study(STUDY, out, progress=False, log=lines.append)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # binarize turns it on for the whole process
    return out, table, lines


def test_every_student_trains_and_beats_chance(finished: tuple[Path, dict, list[str]]) -> None:
    out, table, lines = finished
    assert [row["run"] for row in table["students"]] == RUNS[1:] and not table["missing"]
    assert table["teacher"]["top1"] > 80
    for row in table["students"]:  # ten classes: chance is 10%
        assert row["top1"] > 40, row
        assert row["below_teacher"] == pytest.approx(table["teacher"]["top1"] - row["top1"])
        assert row["file_bytes"] == (out / row["run"] / "model.safetensors").stat().st_size
        assert row["bops"] > 0 and row["ops_reduction"] > 10 and row["smaller"] > 3
        assert row["train_s_per_epoch"] > 0 and row["epochs"] == pytest.approx(40 // len(row["stages"]) *
                                                                               len(row["stages"]) / (1497 // 64))
    assert [len(row["stages"]) for row in table["students"]] == [1, 2, 2, 1, 1, 2]
    assert table["seeds"][0]["student"] == "didb" and table["seeds"][0]["seeds"] == [0, 1]
    assert sum(line.endswith(": training") for line in lines) == len(RUNS)


def test_the_table_is_written(finished: tuple[Path, dict, list[str]]) -> None:
    out, table, _ = finished
    assert json.loads((out / TABLE_JSON).read_text()) == json.loads(json.dumps(table))
    markdown = (out / TABLE_MARKDOWN).read_text()
    for run in RUNS:
        assert f"| {run} |" in markdown, run
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_the_fp16_column_is_the_size_of_an_fp16_export(finished: tuple[Path, dict, list[str]],
                                                        tmp_path: Path) -> None:
    out, table, _ = finished
    row = next(row for row in table["students"] if row["run"] == "didb-seed0")
    written = export(out / "didb-seed0", tmp_path / "fp16.safetensors", fp_dtype="float16")
    teacher_bytes = (out / "teacher" / "teacher.safetensors").stat().st_size
    assert row["smaller_fp16"] == pytest.approx(teacher_bytes / written.stat().st_size, rel=0.01)
    assert row["smaller_fp16"] > 1.3 * row["smaller"]  # most of a tiny model's packed file is fp32 parts


def test_a_second_invocation_trains_nothing(finished: tuple[Path, dict, list[str]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, table, _ = finished
    written = {run: (out / run / "results.json").stat().st_mtime_ns for run in RUNS}
    capsys.readouterr()
    main(["study", str(STUDY), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(json.dumps(table))
    assert captured.err.count("finished earlier, skipped") == len(RUNS) and "training" not in captured.err
    assert written == {run: (out / run / "results.json").stat().st_mtime_ns for run in RUNS}


def test_a_stopped_run_resumes_from_its_checkpoint(finished: tuple[Path, dict, list[str]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped after its last stage (checkpoint written, final files not) resumes instead of retraining;
    its training seconds come from the checkpoint."""
    out, table, _ = finished
    copy = tmp_path / "ci"
    shutil.copytree(out, copy)
    for name in ("results.json", "model.safetensors", "report.json"):
        (copy / "xnor-seed0" / name).unlink()
    capsys.readouterr()
    main(["study", str(STUDY), "--out", str(copy), "--only", "xnor", "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert "xnor-seed0: resuming" in captured.err
    assert json.loads(captured.out)["students"] == json.loads(json.dumps(table["students"]))


def test_only_selects_students(finished: tuple[Path, dict, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    out, _, _ = finished
    capsys.readouterr()
    main(["study", str(STUDY), "--out", str(out), "--only", "didb,bit-seed0"])
    err = capsys.readouterr().err
    assert "4 runs" in err and "xnor" not in err


GOOD = STUDY.read_text()
BAD_STUDIES = {  # case -> (study text, what the one-line error must say)
    "malformed yaml": (GOOD.replace("budget:\n", "budget: [\n"), "malformed YAML"),
    "unknown key": (GOOD.replace("steps: 40", "steps: 40\n  epoch: 2"), "line 19: budget.epoch: unknown key"),
    "both lengths": (GOOD.replace("steps: 40", "steps: 40\n  epochs: 2"), "exactly one of epochs or steps"),
    "unknown recipe": (GOOD.replace("recipe: xnor", "recipe: nope"), "students.0.recipe: nope: no such recipe"),
    "bad override": (GOOD.replace("hfsc=separate", "hfsc=sometimes"), "attention.hfsc"),
    "unknown rule": (GOOD.replace("hfsc=separate", "drop_rule=nope"), "no rule named 'nope'"),
    "no teacher": (GOOD.replace("  train: {steps: 200", "  epochs: {steps: 200"), "teacher.epochs: unknown key"),
    "teacher from nothing": (GOOD.replace("teacher:\n  train: {steps: 200, optimizer: {lr: 3.0e-3, "
                                          "scale_lr_with_batch: false}}", "teacher: {}"), "give teacher.train"),
    "repeated name": (GOOD.replace("name: reactnet", "name: xnor"), "unique (xnor repeated)"),
    "run seed": (GOOD.replace("run: {", "run: {seed: 3, "), "run.seed"),
    "bad name": (GOOD.replace("name: bit,", "name: b/t,"), "students.2.name"),
    "zero epochs": (GOOD.replace("recipe: bit}", "recipe: bit, epochs: 0}"), "students.2.epochs"),
    "teacher source": (GOOD.replace("teacher:\n", "teacher:\n  data: {source: digits}\n"), "teacher.data"),
    "teacher data key": (GOOD.replace("teacher:\n", "teacher:\n  data: {limit: 5}\n"), "teacher.data.limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_STUDIES))
def test_bad_study_files_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, expected = BAD_STUDIES[case]
    assert text != GOOD, "the case did not change the study"
    path = tmp_path / "study.yaml"
    path.write_text(text)
    code, err = _run(["study", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err and str(path) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_reworded_recipe_description_is_not_another_setting(finished: tuple[Path, dict, list[str]],
                                                              tmp_path: Path) -> None:
    out, table, _ = finished
    recipe = tmp_path / "xnor.yaml"
    recipe.write_text((STUDY.parent.parent / "recipes" / "xnor.yaml").read_text()
                      .replace("description:", "description: reworded,", 1))
    study = tmp_path / "study.yaml"
    study.write_text(GOOD.replace("recipe: xnor", f"recipe: {recipe}"))
    lines: list[str] = []
    rows = run_study(study, out, only=["xnor"], progress=False, log=lines.append)["students"]
    assert any("xnor-seed0: finished earlier, skipped" in line for line in lines), lines
    assert [row["top1"] for row in rows] == [row["top1"] for row in table["students"]]


@pytest.mark.parametrize("case", ["missing file", "unknown student", "changed study", "foreign folder"])
def test_bad_invocations_are_one_line_errors(case: str, finished: tuple[Path, dict, list[str]], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, _, _ = finished
    study, args = STUDY, []
    if case == "missing file":
        study, expected = tmp_path / "nope.yaml", "cannot read the study"
    elif case == "unknown student":
        args, expected = ["--only", "nope"], "--only nope: no such student"
    elif case == "changed study":  # the finished runs were trained for 40 steps
        study, expected = tmp_path / "changed.yaml", "stages.0.steps: 40 here, 30 in the study"
        study.write_text(GOOD.replace("steps: 40", "steps: 30"))
    else:
        out, expected = tmp_path / "out", "is not a run of this study"
        (out / "teacher").mkdir(parents=True)
        (out / "teacher" / "notes.txt").write_text("mine")
    code, err = _run(["study", str(study), "--out", str(out), *args], capsys)
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_study_files_load() -> None:
    """Every shipped study validates, with the same budget for every student that does not set its own."""
    paths = sorted(STUDY.parent.glob("*.yaml"))
    assert {"ci.yaml", "fashion_mnist_grid7_small.yaml", "fashion_mnist_grid14.yaml"} <= {p.name for p in paths}
    for path in paths:
        plan = load_study(path)
        lengths = {sum(stage.epochs or stage.steps for stage in run.recipe.stages) for run in plan.students
                   if run.student.epochs is None}
        assert len(lengths) == 1, (path.name, lengths)
        assert plan.teacher is not None


def test_a_student_may_set_its_own_epochs(tmp_path: Path) -> None:
    """A longer schedule for one student (budget.steps 40 for the others) is split over its stages."""
    path = tmp_path / "study.yaml"
    path.write_text(GOOD + "  - {name: bit-longer, recipe: bit, epochs: 3}\n")
    runs = {run.name: run for run in load_study(path).students}
    assert [(stage.epochs, stage.steps) for stage in runs["bit-longer-seed0"].recipe.stages] == [(1.5, None)] * 2
    assert [(stage.epochs, stage.steps) for stage in runs["bit-seed0"].recipe.stages] == [(None, 20)] * 2


def test_a_tuning_trial_sets_optimizer_keys_over_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(GOOD + "  - {name: bit-lr, recipe: bit, optimizer: {lr: 7.0e-4, weight_decay: 0.0}}\n")
    runs = {run.name: run for run in load_study(path).students}
    trial, plain = runs["bit-lr-seed0"].recipe.stages, runs["bit-seed0"].recipe.stages
    assert [(s.optimizer.lr, s.optimizer.weight_decay) for s in trial] == [(7.0e-4, 0.0)] * 2
    assert [s.optimizer.lr for s in plain] != [7.0e-4] * 2
    assert [(s.epochs, s.steps) for s in trial] == [(s.epochs, s.steps) for s in plain]  # the same budget
    path.write_text(GOOD + "  - {name: bit-lr, recipe: bit, optimizer: {lr: fast}}\n")
    with pytest.raises(DidbqError, match="optimizer.lr"):
        load_study(path)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, capsys.readouterr().err


def test_teacher_data_keys_apply_to_the_teacher_only(tmp_path: Path) -> None:
    """A stronger teacher on every training image; the students keep the study's subset."""
    path, subset = tmp_path / "study.yaml", GOOD.replace("augment: none}", "augment: none, train_limit: 500}")
    path.write_text(subset.replace("teacher:\n", "teacher:\n  data: {train_limit: null, augment: light}\n"))
    plain_path = tmp_path / "plain.yaml"
    plain_path.write_text(subset)
    plan, plain = load_study(path), load_study(plain_path)
    assert plain.teacher.recipe.data.train_limit == 500
    assert (plan.teacher.recipe.data.train_limit, plan.teacher.recipe.data.augment) == (None, "light")
    assert plan.teacher.recipe.data.batch_size == plain.teacher.recipe.data.batch_size
    assert [run.recipe.data for run in plan.students] == [run.recipe.data for run in plain.students]


def test_a_recorded_table_continues_on_a_new_machine(finished: tuple[Path, dict, list[str]],
                                                     tmp_path: Path) -> None:
    """--record: the committed table stands in for run folders that are gone. A new machine with only the
    teacher trains just the run missing from the record and a run whose settings changed since; the record
    ends with every row."""
    out, table, _ = finished
    record = tmp_path / "record"
    assert run_study(STUDY, out, progress=False, log=lambda _: None, record=record) == table
    assert json.loads((record / TABLE_JSON).read_text()) == json.loads(json.dumps(table))
    recorded = json.loads((record / TABLE_JSON).read_text())
    recorded["students"] = [row for row in recorded["students"] if row["run"] != "xnor-seed0"]
    next(row for row in recorded["students"] if row["run"] == "bit-seed0")["settings"] = "an-older-setting"
    (record / TABLE_JSON).write_text(json.dumps(recorded))
    machine = tmp_path / "new"
    shutil.copytree(out / "teacher", machine / "teacher")
    lines: list[str] = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        again = run_study(STUDY, machine, progress=False, log=lines.append, record=record)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert sorted(path.name for path in machine.iterdir() if path.is_dir()) == ["bit-seed0", "teacher", "xnor-seed0"]
    assert sum("recorded in" in line for line in lines) == len(RUNS) - 3, lines
    assert [row["run"] for row in again["students"]] == RUNS[1:] and not again["missing"]
    assert json.loads((record / TABLE_JSON).read_text()) == json.loads(json.dumps(again))
    carried = {row["run"]: row for row in again["students"]} | {"teacher": again["teacher"]}
    for row in [table["teacher"], *table["students"]]:
        if row["run"] not in ("xnor-seed0", "bit-seed0"):
            assert carried[row["run"]] == row


def test_a_record_from_another_teacher_is_refused(finished: tuple[Path, dict, list[str]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, table, _ = finished
    record = tmp_path / "record"
    record.mkdir()
    students = [row for row in table["students"] if row["run"] == "didb-seed0"]
    (record / TABLE_JSON).write_text(json.dumps({**table, "teacher": {**table["teacher"], "top1": 12.5},
                                                 "students": students}))
    machine = tmp_path / "new"
    shutil.copytree(out / "teacher", machine / "teacher")
    shutil.copytree(out / "xnor-seed0", machine / "xnor-seed0")
    code, err = _run(["study", str(STUDY), "--out", str(machine), "--record", str(record)], capsys)
    assert code == 2 and "distilled from a teacher of top-1 12.50%" in err and "Traceback" not in err, err
    assert "training" not in err  # refused before any student trains


def test_the_record_keeps_the_teacher(finished: tuple[Path, dict, list[str]], tmp_path: Path) -> None:
    """The record keeps a finished teacher before the next student trains. A new machine with nothing but the
    record distills the missing student from the kept file (the same bytes, so the same result) and trains no
    teacher; a kept file whose bytes differ from the recorded row's sha256 is not used."""
    out, table, _ = finished
    record, kept, first = tmp_path / "record", tmp_path / "record" / "teacher.safetensors", tmp_path / "first"
    shutil.copytree(out / "teacher", first / "teacher")
    kept_when_training: list[bool] = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run_study(STUDY, first, progress=False, record=record, only=["xnor"],
                  log=lambda line: kept_when_training.append(kept.is_file()) if "training" in line else None)
        assert kept_when_training and all(kept_when_training)
        assert kept.read_bytes() == (out / "teacher" / "teacher.safetensors").read_bytes()
        recorded = json.loads((record / TABLE_JSON).read_text())
        assert table["teacher"]["sha256"] and recorded["teacher"] == table["teacher"]
        recorded["students"] = []
        (record / TABLE_JSON).write_text(json.dumps(recorded))
        machine, lines = tmp_path / "new", []
        again = run_study(STUDY, machine, progress=False, log=lines.append, record=record, only=["xnor"])
        assert sorted(path.name for path in machine.iterdir() if path.is_dir()) == ["xnor-seed0"]
        assert any("teacher: weights recorded in" in line for line in lines), lines
        rows = {row["run"]: row for row in again["students"]}
        original = next(row for row in table["students"] if row["run"] == "xnor-seed0")
        assert rows["xnor-seed0"]["top1"] == original["top1"] and again["teacher"] == table["teacher"]
        kept.write_bytes(kept.read_bytes()[:-4] + b"    ")  # not the recorded teacher any more
        (record / TABLE_JSON).write_text(json.dumps(recorded))
        shutil.rmtree(machine)
        run_study(STUDY, machine, progress=False, log=lambda _: None, record=record, only=["xnor"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert (machine / "teacher" / "results.json").exists()
    assert kept.read_bytes() == (machine / "teacher" / "teacher.safetensors").read_bytes()


def test_a_rules_optional_flag_is_not_another_setting(tmp_path: Path) -> None:
    """`optional` only silences a warning: flipping it keeps every recorded row's settings hash."""
    from didbq.study import settings_digest

    recipe = tmp_path / "bit.yaml"
    text = (Path(__file__).resolve().parent.parent / "recipes" / "bit.yaml").read_text()
    assert "optional: true" in text
    recipe.write_text(text.replace("optional: true", "optional: false"))
    path = tmp_path / "study.yaml"
    path.write_text(GOOD.replace("recipe: bit}", f"recipe: {recipe}}}"))
    plan, flipped = load_study(STUDY), load_study(path)
    bit, bit_flipped = (next(run for run in p.students if run.name == "bit-seed0") for p in (plan, flipped))
    assert bit.recipe != bit_flipped.recipe
    assert settings_digest(plan, bit) == settings_digest(flipped, bit_flipped)


def test_the_committed_tables_still_match_their_study_files() -> None:
    """A new recipe option (at the value that computes what older runs did) must not make the committed study
    rows stale: each recorded teacher and student still has the settings hash its study file gives it now, so
    `--record` skips them on a new machine instead of training hours again."""
    from didbq.study import settings_digest

    plans = {plan.study.name: plan for plan in map(load_study, sorted(STUDY.parent.glob("*.yaml")))}
    tables = sorted((STUDY.parent.parent / "docs" / "studies").glob(f"*/{TABLE_JSON}"))
    assert tables
    for table_file in tables:
        table = json.loads(table_file.read_text())
        plan = plans[table["study"]]
        assert table["teacher"]["settings"] == settings_digest(plan, plan.teacher), table_file
        wanted = {run.name: settings_digest(plan, run) for run in plan.students}
        stale = [row["run"] for row in table["students"] if wanted.get(row["run"], row["settings"]) != row["settings"]]
        assert not stale, (table_file, stale)


def test_an_option_added_later_leaves_the_settings_at_its_neutral_value() -> None:
    from didbq.convert.recipe import load_recipe
    from didbq.study import ADDED_LATER, _settings

    assert ("attention", "shortcut_init") in ADDED_LATER
    assert "shortcut_init" not in _settings(load_recipe("didb"))["attention"]
    assert _settings(load_recipe("didb[shortcut_init=0.6]"))["attention"]["shortcut_init"] == 0.6
