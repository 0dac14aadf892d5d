"""`didbq study`: one full-precision teacher, students from several recipes on the same budget, a results table.

A study file (YAML, every key validated; see studies/ci.yaml) names the model, the data, the teacher (trained
here once, or a checkpoint), the budget every student gets (epochs or steps in total, split evenly over its
stages, so that one-stage and two-stage students train equally long; the same batch, data and optimizer
settings) and the students: a recipe with `[key=value]` overrides (didbq.convert.overrides), one- or two-stage
training, and seeds. Each run is a `didbq binarize` run in its own folder under the study's folder, and every
student distills from the same teacher file; a finished run is skipped and a stopped one resumed, so a study can
be spread over several sittings. The table (results.md, results.json) is built from the run folders and, with a
record folder (a table committed earlier, e.g. docs/studies/NAME), from the recorded rows of runs whose folders
are gone: a study continues on a new machine from its committed table, each row reused only for the same settings
and the same teacher. The record keeps the trained teacher's weights too (its sha256 in the teacher row), so that
a new machine distills the missing students from that file instead of training the teacher again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from didbq.convert.overrides import recipe_data, reshaped_stages
from didbq.convert.recipe import (
    DataSection,
    Optimizer,
    Recipe,
    RunSection,
    Schedule,
    Strict,
    TeacherSection,
    exactly_one_length,
    line_of,
    read_yaml,
    read_yaml_file,
    validated,
)
from didbq.errors import DidbqError, RecipeError, StudyError
from didbq.train import distributed
from didbq.train.checkpoint import atomic_path, write_json, write_text
from didbq.train.run_folder import read_run
from didbq.train.runner import BinarizeConfig, binarize

RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TEACHER_RUN = "teacher"
TEACHER_FILE = "teacher.safetensors"
TABLE_MARKDOWN, TABLE_JSON = "results.md", "results.json"
# A student's own measurement of its teacher must match the teacher run's (same weights, same test images);
# more than this many points apart means the student was distilled from another teacher.
TEACHER_TOLERANCE = 0.1
Log = Callable[[str], None]
# run states that train nothing, and what the log says of each
SKIPPED = {"done": "finished earlier, skipped", "recorded": "recorded in {record}, skipped",
           "recorded teacher": f"weights recorded in {{record}}/{TEACHER_FILE}, not trained again",
           "not needed": "not needed (every selected student is finished)"}


# ----------------------------------------------------------------------------------------------------- schema

class StudyModel(Strict):
    name: str = Field(description="timm model name")
    args: dict[str, Any] = Field(default_factory=dict, description="timm.create_model arguments")


class StudyData(DataSection):
    """The recipe's `data:` section for every run, plus the source; data.seed defaults to the study's seed, so
    that every run (whatever its own seed) uses the same train_limit / test_limit images."""

    source: str = Field(description="what `didbq binarize --data` takes: fashion-mnist, digits, a folder, a file")


class TeacherData(DataSection):
    """The keys given here replace the study's data keys in the teacher run (`train_limit: null` = every image);
    the students keep the study's."""

    @model_validator(mode="after")
    def _same_source(self) -> "TeacherData":
        if "source" in self.model_fields_set:
            raise ValueError("source: the teacher trains on the study's data.source")
        return self


class StudyTeacher(TeacherSection):
    """Trained here by `train` (labels only; name, precision and loss are filled in), or a checkpoint."""

    pretrained: bool = Field(False, description="start `train` from timm's pretrained weights (needs a network)")
    checkpoint: str | None = Field(None, description="full-precision weights, relative to the study file; "
                                                     "with `train`: fine-tuned first")
    data: TeacherData | None = Field(None, description="data keys of the teacher run only, over the study's (e.g. "
                                                       "all training images and augmentation: a stronger teacher)")

    @model_validator(mode="before")
    @classmethod
    def _teacher_stage(cls, data: Any) -> Any:
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict):
            loss = {"kd_weight": 0.0, "label_weight": 1.0, **(train.get("loss") or {})}
            data = {**data, "train": {"name": TEACHER_RUN, "weights": "fp", "activations": "fp", **train,
                                      "loss": loss}}
        return data

    @model_validator(mode="after")
    def _source(self) -> "StudyTeacher":
        if self.train is None and self.checkpoint is None:
            raise ValueError("give teacher.train (the teacher is trained here) or teacher.checkpoint")
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("give teacher.pretrained or teacher.checkpoint, not both")
        return self


class Budget(Strict):
    """What every student gets, whatever its recipe says."""

    epochs: float | None = Field(None, gt=0, description="training epochs per student, split evenly over its stages")
    steps: int | None = Field(None, gt=0, description="training steps per student, split evenly (rounded down)")
    optimizer: Optimizer | None = Field(None, description="optimizer keys set in every student stage")
    schedule: Schedule | None = Field(None, description="schedule keys set in every student stage")

    @model_validator(mode="after")
    def _length(self) -> "Budget":
        exactly_one_length(self.epochs, self.steps)
        return self


class Student(Strict):
    name: str = Field(pattern=RUN_NAME, description="its runs are the folders <name>-seed<seed>")
    recipe: str = Field(description="recipe file (relative to the study file) or built-in name, optionally with "
                                    "overrides: didb[hfsc=off,local=off], didb[into.MLP activation=rprelu]")
    stages: Literal["recipe", "one", "two"] = Field(
        "recipe", description="the recipe's stages; one: fully binary only; two: binary weights, then fully binary "
                              "(both built from the recipe's last stage)")
    seeds: list[int] | None = Field(None, min_length=1, description="default: [the study's seed]")
    epochs: float | None = Field(None, gt=0, description="instead of budget.epochs or budget.steps: a longer or "
                                                         "shorter schedule, to measure what the budget costs")
    optimizer: Optimizer | None = Field(None, description="optimizer keys of this student's stages, over the "
                                                          "budget's: a tuning trial (lr, weight_decay, ...)")
    description: str = ""


class Study(Strict):
    name: str = Field(pattern=RUN_NAME)
    description: str = ""
    seed: int = Field(0, description="seed of the teacher, of the data subsets, and of students without seeds")
    model: StudyModel
    data: StudyData
    teacher: StudyTeacher
    budget: Budget
    run: RunSection = Field(default_factory=RunSection, description="checkpoint and log intervals, amp, ...")
    students: list[Student] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Study":
        if "seed" in self.run.model_fields_set:
            raise ValueError("run.seed: the seeds are the study's `seed` and each student's `seeds`")
        names = [student.name for student in self.students]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"student names must be unique ({', '.join(repeated)} repeated)")
        for student in self.students:
            if student.seeds is not None and len(set(student.seeds)) != len(student.seeds):
                raise ValueError(f"student {student.name!r}: repeated seeds {student.seeds}")
        return self


# ----------------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class StudyRun:
    """One `didbq binarize` run of the study: the teacher (student None) or a student with one seed."""

    name: str
    student: Student | None
    seed: int
    recipe: Recipe


@dataclass(frozen=True)
class StudyPlan:
    study: Study
    path: Path
    teacher: StudyRun | None  # None: the checkpoint is the teacher as it is
    students: list[StudyRun]

    def teacher_file(self, out: Path) -> Path:
        """The teacher every student distills from (unless the record keeps it)."""
        return out / TEACHER_RUN / TEACHER_FILE if self.teacher is not None else self.teacher_checkpoint()

    def teacher_checkpoint(self) -> Path | None:
        """What the teacher run starts from (a checkpoint to fine-tune), if anything."""
        checkpoint = self.study.teacher.checkpoint
        return self.path.parent / checkpoint if checkpoint is not None else None


def load_study(path: Path) -> StudyPlan:
    """The validated study and every run's recipe; mistakes are one line naming the file, line and key."""
    text = read_yaml_file(path, "study", "studies/ci.yaml", StudyError)
    node, data = read_yaml(text, str(path), StudyError)
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a study is a YAML mapping (see studies/ci.yaml)")
    study: Study = validated(Study, data, str(path), node, StudyError)
    students = []
    for index, student in enumerate(study.students):
        try:
            students += [StudyRun(f"{student.name}-seed{seed}", student, seed,
                                  _student_recipe(study, student, seed, path.parent))
                         for seed in student.seeds or [study.seed]]
        except RecipeError as error:
            line = line_of(node, ("students", index, "recipe"))
            raise StudyError(f"{path}: line {line}: students.{index}.recipe: {error}") from None
    teacher = None
    if study.teacher.train is not None:
        teacher = StudyRun(TEACHER_RUN, None, study.seed, _teacher_recipe(study))
    return StudyPlan(study, path, teacher, students)


def _data_section(study: Study) -> dict[str, Any]:
    section = study.data.model_dump(exclude={"source"})
    return {**section, "seed": study.seed if study.data.seed is None else study.data.seed}


def _run_section(study: Study, seed: int) -> dict[str, Any]:
    return {**study.run.model_dump(), "seed": seed}


def _teacher_recipe(study: Study) -> Recipe:
    teacher = study.teacher
    data = {"name": f"{study.name}-teacher", "description": f"the full-precision teacher of study {study.name}",
            "model": {"args": study.model.args},
            "data": {**_data_section(study), **(teacher.data.model_dump(exclude_unset=True) if teacher.data else {})},
            "teacher": {"pretrained": teacher.pretrained, "train": teacher.train.model_dump()},
            "run": _run_section(study, study.seed)}
    return validated(Recipe, data, f"{study.name}: teacher")


def _student_recipe(study: Study, student: Student, seed: int, base: Path) -> Recipe:
    """The student's recipe with the study's model, data, budget and seed; the teacher comes as a checkpoint."""
    data = recipe_data(student.recipe, base)
    budget = study.budget if student.epochs is None else \
        study.budget.model_copy(update={"epochs": student.epochs, "steps": None})
    stages = _budgeted(_shaped(data.get("stages") or [], student.stages, student.recipe), budget, student.optimizer)
    data.update(name=f"{student.name}-seed{seed}", model={"args": study.model.args}, data=_data_section(study),
                teacher={"pretrained": False}, stages=stages, run=_run_section(study, seed))
    return validated(Recipe, data, student.recipe)


def _shaped(stages: list[dict[str, Any]], mode: str, spec: str) -> list[dict[str, Any]]:
    """The recipe's stages, or one / two stages built from its last stage (its optimizer, schedule and loss)."""
    if mode == "recipe" and stages:
        return stages
    return reshaped_stages(stages, mode, spec)  # also the one-line error for a recipe without stages


def _budgeted(stages: list[dict[str, Any]], budget: Budget, trial: Optimizer | None = None
              ) -> list[dict[str, Any]]:
    """Stage lengths from the budget (split evenly), the budget's optimizer and schedule keys, and a tuning
    trial's optimizer keys over them."""
    count = len(stages)
    if budget.steps is not None and budget.steps < count:
        raise RecipeError(f"budget.steps {budget.steps} is fewer than the recipe's {count} stages")
    length = ({"epochs": budget.epochs / count, "steps": None} if budget.epochs is not None
              else {"epochs": None, "steps": budget.steps // count})
    optimizer = budget.optimizer.model_dump(exclude_unset=True) if budget.optimizer else {}
    optimizer.update(trial.model_dump(exclude_unset=True) if trial else {})
    schedule = budget.schedule.model_dump(exclude_unset=True) if budget.schedule else {}
    return [{**stage, **length, "min_steps": None, "optimizer": {**(stage.get("optimizer") or {}), **optimizer},
             "schedule": {**(stage.get("schedule") or {}), **schedule}} for stage in stages]


# ----------------------------------------------------------------------------------------------------- running

def run_study(path: Path, out: Path, only: Sequence[str] = (), device: str = "auto", progress: bool = True,
              log: Log = print, record: Path | None = None) -> dict[str, Any]:
    """Run (or continue) the study in `path` under `out`; returns the table also written to out/results.*.

    The teacher run comes first (skipped when finished, or when no student is left to train); then the students
    (all, or those named in `only`). A student that fails (e.g. a diverging loss) is reported and the others
    still run. With `record`, a run recorded there with the same settings is skipped, and the table is written
    there too after every run."""
    plan = load_study(path)
    if plan.teacher is None and not plan.teacher_file(out).is_file():
        raise StudyError(f"{plan.path}: teacher.checkpoint {plan.teacher_file(out)} does not exist")
    recorded = _recorded(plan, record)[1]
    kept_teacher = _recorded_teacher_file(plan, out, record)
    teacher_file = kept_teacher or plan.teacher_file(out)
    if recorded:
        study_table(plan, out, record)  # a record from another teacher fails here, before anything trains
    students = _selected(plan.students, only)
    states = {run.name: _state(out / run.name, run, plan) for run in students}  # a mismatching folder fails here
    states.update({name: "recorded" for name, state in states.items() if state == "start" and name in recorded})
    runs = students
    if plan.teacher is not None:
        runs = [plan.teacher, *students]
        training = any(state in ("start", "resume") for state in states.values())
        teacher_state = _state(out / TEACHER_RUN, plan.teacher, plan)
        states[TEACHER_RUN] = ("recorded teacher" if kept_teacher is not None else
                               teacher_state if training or teacher_state == "done" else "not needed")
    context = distributed.setup(device)
    if context.active:
        raise StudyError("run a study in one process (torchrun is for single `didbq binarize` runs)")
    finished = sum(state in ("done", "recorded") for state in states.values())
    log(f"study {plan.study.name}: {len(runs)} runs in {out} ({finished} finished earlier)")
    if record is not None and states.get(TEACHER_RUN) == "done":
        _write_tables(plan, out, record)  # the record keeps the teacher now, not after the next student
    failed = []
    for number, run in enumerate(runs, 1):
        prefix = f"[{number}/{len(runs)}] {run.name}"
        if states[run.name] in SKIPPED:
            log(f"{prefix}: {SKIPPED[states[run.name]].format(record=record)}")
            continue
        log(f"{prefix}: {'resuming' if states[run.name] == 'resume' else 'training'}")
        started = time.perf_counter()
        try:
            _execute(plan, run, out, teacher_file, states[run.name], context, progress, log)
        except DidbqError as error:
            if run.student is None:
                raise
            log(f"{prefix}: failed: {error}")
            failed.append(run.name)
            continue
        log(f"{prefix}: finished in {(time.perf_counter() - started) / 60:.1f} min")
        _write_tables(plan, out, record)  # after every run: a study stopped later keeps this row
    table = _write_tables(plan, out, record)
    if failed:
        raise StudyError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); the others are in "
                         f"{out / TABLE_MARKDOWN}; run the study again to retry them")
    return table


def _write_tables(plan: StudyPlan, out: Path, record: Path | None) -> dict[str, Any]:
    table = study_table(plan, out, record)
    for folder in (out, record) if record is not None else (out,):
        write_table(table, folder)
    if record is not None and plan.teacher is not None and (out / TEACHER_RUN / "results.json").exists():
        _keep_teacher(out / TEACHER_RUN / TEACHER_FILE, record / TEACHER_FILE, table["teacher"]["sha256"])
    return table


def _keep_teacher(trained: Path, kept: Path, sha256: str) -> None:
    """The record keeps the teacher its rows were distilled from (a new machine then skips training it)."""
    if kept.is_file() and _sha256(kept) == sha256:
        return
    with atomic_path(kept) as temporary:
        shutil.copyfile(trained, temporary)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_teacher_file(plan: StudyPlan, out: Path, record: Path | None) -> Path | None:
    """The teacher kept in the record, when this study would train that very teacher (same settings, same
    bytes as the recorded row says) and it has not been trained in `out`."""
    if plan.teacher is None or record is None or (out / TEACHER_RUN / "results.json").exists():
        return None
    teacher, kept = _recorded(plan, record)[0], record / TEACHER_FILE
    if teacher is None or not kept.is_file() or teacher.get("sha256") != _sha256(kept):
        return None
    return kept


def _selected(students: list[StudyRun], only: Sequence[str]) -> list[StudyRun]:
    """The student runs named by student name or run name (all without `only`)."""
    if not only:
        return students
    known = {run.name for run in students} | {run.student.name for run in students}
    unknown = [name for name in only if name not in known]
    if unknown:
        names = ", ".join(dict.fromkeys(run.student.name for run in students))
        raise StudyError(f"--only {unknown[0]}: no such student (students: {names})")
    return [run for run in students if run.name in only or run.student.name in only]


def _state(folder: Path, run: StudyRun, plan: StudyPlan) -> Literal["done", "resume", "start"]:
    """done (results.json written), resume (a checkpoint exists) or start; a folder made with other settings is
    an error rather than a silently mixed table."""
    if (folder / "results.json").exists() or (folder / "checkpoints" / "last.pt").exists():
        _check_same(folder, run, plan)
        return "done" if (folder / "results.json").exists() else "resume"
    if folder.exists() and any(folder.iterdir()) and not (folder / "run.json").exists():
        raise StudyError(f"{folder} is not a run of this study (no run.json); move it away or choose another --out")
    return "start"


def _check_same(folder: Path, run: StudyRun, plan: StudyPlan) -> None:
    saved, recipe = read_run(folder)
    found = {"model_name": saved["model_name"], "data_source": saved["data"], **_settings(recipe)}
    difference = _difference(found, _wanted(plan, run))
    if difference is not None:
        raise StudyError(f"{folder} was run with other settings than the study's ({difference}); delete the folder "
                         f"to run it again, or choose another --out")


def _wanted(plan: StudyPlan, run: StudyRun) -> dict[str, Any]:
    """The settings a run of this study trains with: model, data source and effective recipe."""
    return {"model_name": plan.study.model.name, "data_source": plan.study.data.source, **_settings(run.recipe)}


def settings_digest(plan: StudyPlan, run: StudyRun) -> str:
    """A short hash of the run's settings, kept in its table row: a recorded row stands for a run only while the
    study still asks for the same settings."""
    return hashlib.sha256(json.dumps(_wanted(plan, run), sort_keys=True, default=str).encode()).hexdigest()[:16]


# Recipe options added after studies had recorded rows, each with the value at which it computes what the runs
# made before it computed. At that value a run's settings leave it out, so that a new option neither makes every
# recorded row stale nor trains the kept teacher again (tests/test_study.py checks the committed tables).
ADDED_LATER: dict[tuple[str, str], Any] = {("attention", "shortcut_init"): 1.0}


def _settings(recipe: Recipe) -> dict[str, Any]:
    """What a run was trained with: the effective recipe without what does not change training (a reworded
    description, a rule's `optional` flag, which only silences a warning, an option added later at its neutral
    value) and so is no reason to train again."""
    settings = {key: value for key, value in recipe.effective().items() if key != "description"}
    rules = [{key: value for key, value in rule.items() if key != "optional"} for rule in settings["binarize"]["rules"]]
    settings = {**settings, "binarize": {**settings["binarize"], "rules": rules}}
    for (section, key), neutral in ADDED_LATER.items():
        if settings[section].get(key, neutral) == neutral:
            settings[section] = {name: value for name, value in settings[section].items() if name != key}
    return settings


def _difference(found: Any, wanted: Any, path: str = "") -> str | None:
    """The first key path where two nested structures differ, with both values."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        keys = dict.fromkeys([*found, *wanted])
        pairs = [(f"{path}.{key}" if path else str(key), found.get(key), wanted.get(key)) for key in keys]
    elif isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        pairs = [(f"{path}.{index}", a, b) for index, (a, b) in enumerate(zip(found, wanted))]
    else:
        return None if found == wanted else f"{path}: {found!r} here, {wanted!r} in the study"
    return next((d for p, a, b in pairs if (d := _difference(a, b, p)) is not None), None)


def _execute(plan: StudyPlan, run: StudyRun, out: Path, teacher_file: Path, state: str,
             context: distributed.Distributed, progress: bool, log: Log) -> None:
    checkpoint = plan.teacher_checkpoint() if run.student is None else teacher_file
    config = BinarizeConfig(plan.study.model.name, plan.study.data.source, out / run.name, checkpoint,
                            resume=state == "resume", force=state == "start", progress=progress)
    binarize(config, run.recipe, context, log)


# ----------------------------------------------------------------------------------------------------- table

def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def study_table(plan: StudyPlan, out: Path, record: Path | None = None) -> dict[str, Any]:
    """The results of every finished run, from the run folders (and the rows recorded in `record` for runs
    without a folder here): the teacher, each student, seed summaries."""
    recorded_teacher, recorded = _recorded(plan, record)
    finished = {run.name for run in plan.students if (out / run.name / "results.json").exists()}
    carried = {run.name for run in plan.students if run.name not in finished and run.name in recorded}
    teacher = recorded_teacher
    kept = _recorded_teacher_file(plan, out, record) is not None  # then the recorded row is this teacher's
    if not kept and (finished or (out / TEACHER_RUN / "results.json").exists() or recorded_teacher is None):
        teacher = _teacher_row(plan, out, [run for run in plan.students if run.name in finished])
        if carried and abs(teacher["top1"] - recorded_teacher["top1"]) > TEACHER_TOLERANCE:
            raise StudyError(f"the rows recorded in {record} were distilled from a teacher of top-1 "
                             f"{recorded_teacher['top1']:.2f}%, the teacher in {out} has {teacher['top1']:.2f}%; "
                             f"record into another folder, or delete {out / TEACHER_RUN} to train it again")
    rows = [_student_row(plan, run, out / run.name, teacher) if run.name in finished else recorded[run.name]
            for run in plan.students if run.name in finished | carried]
    study = plan.study
    return {"study": study.name, "description": study.description.strip(),
            "model": study.model.model_dump(), "data": study.data.source,
            "budget": study.budget.model_dump(exclude_none=True, exclude_unset=True),
            "batch_size": study.data.batch_size, "teacher": teacher, "students": rows,
            "seeds": _seed_summaries(rows),
            "missing": [run.name for run in plan.students if run.name not in finished | carried]}


def _recorded(plan: StudyPlan, record: Path | None) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The teacher row and, by run name, the student rows of the table in `record` whose settings are still the
    study's (none without a record, or when the teacher's settings changed since)."""
    if record is None or not (record / TABLE_JSON).is_file():
        return None, {}
    table = _read_json(record / TABLE_JSON)
    teacher = table["teacher"]
    wanted_teacher = settings_digest(plan, plan.teacher) if plan.teacher is not None else None
    if teacher.get("settings") != wanted_teacher:
        return None, {}
    digests = {run.name: settings_digest(plan, run) for run in plan.students}
    return teacher, {row["run"]: row for row in table["students"]
                     if row.get("settings") is not None and digests.get(row["run"]) == row["settings"]}


def _teacher_row(plan: StudyPlan, out: Path, finished: list[StudyRun]) -> dict[str, Any]:
    """The full-precision teacher in the students' columns: its accuracy (from its own run, or as the students
    measured it), its file, and its FLOPs (the reports' full-precision reference)."""
    file = plan.teacher_file(out)
    measured: dict[str, Any] = {}
    if plan.teacher is not None and (out / TEACHER_RUN / "results.json").exists():
        measured = _read_json(out / TEACHER_RUN / "results.json")[TEACHER_RUN]
    elif finished:
        measured = _read_json(out / finished[0].name / "results.json")[TEACHER_RUN]
    flops = None
    if finished:
        flops = _read_json(out / finished[0].name / "report.json")["totals"]["fp_reference_flops"]
    train_s, epochs = measured.get("train_s"), measured.get("epochs")
    return {"run": TEACHER_RUN, "student": None, "recipe": "full precision", "stages": [TEACHER_RUN] if epochs else [],
            "seed": plan.study.seed, "top1": measured.get("top1"), "top5": measured.get("top5"),
            "below_teacher": 0.0 if measured else None,
            "file_bytes": file.stat().st_size if file.exists() else None,
            "sha256": _sha256(file) if file.exists() else None, "smaller": 1.0, "smaller_fp16": None,
            "bops": 0 if flops is not None else None, "flops": flops, "ops": flops,
            "ops_reduction": 1.0, "train_s": train_s, "epochs": epochs,
            "train_s_per_epoch": train_s / epochs if train_s and epochs else None,
            "settings": settings_digest(plan, plan.teacher) if plan.teacher is not None else None}


def _student_row(plan: StudyPlan, run: StudyRun, folder: Path, teacher: dict[str, Any]) -> dict[str, Any]:
    results, report = _read_json(folder / "results.json"), _read_json(folder / "report.json")
    measured_teacher = results[TEACHER_RUN]["top1"]
    if teacher["top1"] is not None and abs(measured_teacher - teacher["top1"]) > TEACHER_TOLERANCE:
        raise StudyError(f"{folder} was distilled from another teacher (top-1 {measured_teacher:.2f}%, the study's "
                         f"teacher {teacher['top1']:.2f}%); delete the folder to run it again")
    phases = [results[stage.name] for stage in run.recipe.stages]
    final, totals, file_bytes = phases[-1], report["totals"], report["file"]["file_bytes"]
    # the same file with its floating-point tensors in fp16 (`didbq export --fp16`): the header barely changes
    file_bytes_fp16 = file_bytes - totals["packed_bytes"] + totals["packed_bytes_fp16"]
    train_s, epochs = sum(p["train_s"] for p in phases), sum(p["epochs"] for p in phases)
    return {"run": run.name, "student": run.student.name, "recipe": run.student.recipe,
            "stages": [stage.name for stage in run.recipe.stages], "seed": run.seed,
            "top1": final["top1"], "top5": final["top5"],
            "below_teacher": teacher["top1"] - final["top1"] if teacher["top1"] is not None else None,
            "file_bytes": file_bytes,
            "smaller": teacher["file_bytes"] / file_bytes if teacher["file_bytes"] else None,
            "smaller_fp16": teacher["file_bytes"] / file_bytes_fp16 if teacher["file_bytes"] else None,
            "bops": totals["bops"], "flops": totals["flops"], "ops": totals["ops"],
            "ops_reduction": totals["ops_reduction"], "train_s": train_s, "epochs": epochs,
            "train_s_per_epoch": train_s / epochs, "settings": settings_digest(plan, run)}


def _seed_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and half the range (max - min) / 2 of top-1 and of the gap, for students run with several seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["student"], []).append(row)
    summaries = []
    for student, group in groups.items():
        if len(group) < 2:
            continue
        summary: dict[str, Any] = {"student": student, "seeds": [row["seed"] for row in group]}
        for key in ("top1", "below_teacher"):
            values = [row[key] for row in group if row[key] is not None]
            if values:
                summary[key] = statistics.fmean(values)
                summary[f"{key}_spread"] = (max(values) - min(values)) / 2
        summaries.append(summary)
    return summaries


def _cell(value: Any, form: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, form) + suffix


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"


# (header, cell) of the results table; the CLI's table and results.md show the same columns.
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("run", lambda r: r["run"]),
    ("recipe", lambda r: r["recipe"]),
    ("stages", lambda r: str(len(r["stages"]))),
    ("epochs", lambda r: _cell(r["epochs"], "g")),
    ("seed", lambda r: str(r["seed"])),
    ("top-1 %", lambda r: _cell(r["top1"], ".2f")),
    ("below teacher", lambda r: _cell(r["below_teacher"], ".2f")),
    ("packed size", lambda r: _size(r["file_bytes"])),
    ("smaller than teacher", lambda r: _cell(r["smaller"], ".1f", suffix="x")),
    ("with fp16 parts", lambda r: _cell(r["smaller_fp16"], ".1f", suffix="x")),
    ("BOPs", lambda r: _cell(r["bops"], ",")),
    ("FLOPs", lambda r: _cell(r["flops"], ",")),
    ("OPs", lambda r: _cell(r["ops"], ",.0f")),
    ("OPs reduction", lambda r: _cell(r["ops_reduction"], ".1f", suffix="x")),
    ("train s/epoch", lambda r: _cell(r["train_s_per_epoch"], ".1f")),
]
SEED_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("student", lambda s: s["student"]),
    ("seeds", lambda s: ", ".join(map(str, s["seeds"]))),
    ("top-1 % (mean ± half range)", lambda s: f"{s['top1']:.2f} ± {s['top1_spread']:.2f}"),
    ("below teacher", lambda s: f"{s['below_teacher']:.2f} ± {s['below_teacher_spread']:.2f}"
     if "below_teacher" in s else "–"),
]


def _markdown_table(columns: list[tuple[str, Callable[[dict[str, Any]], str]]], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested keys as dotted paths: {optimizer: {lr: 0.001}} -> [("optimizer.lr", 0.001)]."""
    return [pair for key, value in data.items()
            for pair in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)])]


def markdown(table: dict[str, Any]) -> str:
    """results.md: what was compared, under which budget, and the table."""
    budget = ", ".join(f"{key} {value}" for key, value in _flat(table["budget"]))
    args = ", ".join(f"{key}={value}" for key, value in table["model"]["args"].items())
    parts = [f"# Study `{table['study']}`", table["description"],
             f"Model `{table['model']['name']}` ({args}), data `{table['data']}`, batch {table['batch_size']}; "
             f"budget per student: {budget} (split evenly over its stages). Top-1 on the test split; 'below "
             f"teacher' in points; sizes are the written files (teacher: fp32 safetensors); OPs = FLOPs + BOPs/64.",
             _markdown_table(COLUMNS, [table["teacher"], *table["students"]])]
    if table["seeds"]:
        parts += ["Students run with several seeds:", _markdown_table(SEED_COLUMNS, table["seeds"])]
    if table["missing"]:
        parts.append(f"Not finished yet: {', '.join(table['missing'])}.")
    return "\n\n".join(part for part in parts if part) + "\n"


def write_table(table: dict[str, Any], out: Path) -> None:
    write_text(out / TABLE_MARKDOWN, markdown(table))
    write_json(out / TABLE_JSON, table)
