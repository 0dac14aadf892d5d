"""`didbq binarize`: the teacher, the conversion, the distillation stages, checkpoints, resume and DDP.

The run is a list of phases: an optional full-precision teacher fine-tuning, then the recipe's stages (none: a
teacher-only run, whose product is teacher.safetensors). Each phase is a deterministic function of (seed, phase,
step): the data order and augmentation come from the step number, and a checkpoint holds the model, optimizer,
scheduler and RNG, so a run killed at any moment and resumed from its last checkpoint ends with the same weights
as an uninterrupted one (CPU, deterministic mode). results.json holds each phase's accuracy, training seconds
(summed over resumed sittings) and epochs.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from didbq.convert.models import build_model
from didbq.convert.recipe import Recipe, Stage
from didbq.convert.walker import convert
from didbq.errors import DidbqError
from didbq.nn import set_binarization
from didbq.train.allocator import retain_freed_memory
from didbq.train.checkpoint import (
    load_checkpoint,
    load_fitting,
    load_weights,
    misfits,
    read_weights,
    save_checkpoint,
    save_weights,
    write_json,
    write_text,
)
from didbq.train.data import (
    ImageData,
    TransformedImages,
    batches_for_rank,
    epoch_order,
    load_image_data,
    preprocessing,
    transform_spec_for,
)
from didbq.train.distributed import Distributed
from didbq.train.evaluate import evaluate
from didbq.train.losses import Taps, latent_binary_weights, total_loss
from didbq.train.optim import build_optimizer, build_schedule
from didbq.train.recompute import enable_grad_checkpointing, wants_grad_checkpointing

TEACHER = "teacher"
Log = Callable[[str], None]


@dataclass
class BinarizeConfig:
    """What `didbq binarize` was asked to do (saved as run.json so that --resume and eval can rebuild it)."""

    model_name: str
    data: str
    out: Path
    teacher_checkpoint: Path | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True


@dataclass
class Phase:
    index: int
    name: str
    stage: Stage
    trains_teacher: bool


@dataclass
class RunState:
    """Where a run stands: the phase and step to do next, restored from checkpoints/last.pt on --resume."""

    phase: int = 0
    step: int = 0
    checkpoint: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # training time per phase, kept across resumes


def _write_guard(out: Path, resume: bool, force: bool) -> None:
    """Never overwrite a non-empty output folder without --force; --resume needs a run to resume."""
    if resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise DidbqError(f"{out}: nothing to resume (no checkpoints/last.pt); start without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            resumable = f" or --resume {out} to continue it" if (out / "checkpoints" / "last.pt").exists() else ""
            raise DidbqError(f"{out} exists and is not empty; pass --force to overwrite it{resumable}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class Run:
    def __init__(self, config: BinarizeConfig, recipe: Recipe, context: Distributed, log: Log) -> None:
        self.config, self.recipe, self.context, self.log = config, recipe, context, log
        self.out = config.out
        self.device = context.device
        self.metrics_path = self.out / "metrics.jsonl"

    # ------------------------------------------------------------------ set-up

    def _build_teacher(self, data: ImageData) -> tuple[nn.Module, bool]:
        """The full-precision teacher with a head for the data's classes, and whether it must be trained."""
        recipe, checkpoint = self.recipe, self.config.teacher_checkpoint
        can_train = recipe.teacher.train is not None
        args = {**recipe.model.args, "num_classes": data.num_classes}
        if checkpoint is not None:
            teacher = build_model(self.config.model_name, pretrained=False, **args)
            mismatch = self._load_teacher_checkpoint(teacher, checkpoint, data.num_classes, can_train)
            return teacher, mismatch
        if recipe.teacher.pretrained:
            teacher = build_model(self.config.model_name, pretrained=True, **args)
            if not can_train:
                raise DidbqError("the pretrained head was resized to the data's classes and needs training: add "
                                 "teacher.train to the recipe, or give --teacher-checkpoint")
            return teacher, True
        if not can_train:
            raise DidbqError("no teacher: give --teacher-checkpoint, set teacher.pretrained: true, or add "
                             "teacher.train to the recipe")
        return build_model(self.config.model_name, pretrained=False, **args), True

    def _load_teacher_checkpoint(self, teacher: nn.Module, path: Path, classes: int, can_train: bool) -> bool:
        """Load the checkpoint; if only the head does not fit (another number of classes), load the rest and
        return True: the resized head must be trained by teacher.train."""
        if not path.exists():
            raise DidbqError(f"{path}: no such teacher checkpoint")
        problems = misfits(read_weights(path), teacher)
        if not problems:
            load_weights(path, teacher)
            return False
        if not can_train:
            raise DidbqError(f"{path}: the teacher checkpoint does not fit {self.config.model_name} with {classes} "
                             f"classes ({problems[0]}); give a matching checkpoint, or add teacher.train to the "
                             f"recipe to fine-tune a resized head")
        skipped = load_fitting(path, teacher)
        self.log(f"teacher checkpoint: {len(skipped)} tensors do not fit {classes} classes ({', '.join(skipped[:2])}"
                 f"); they start fresh and teacher.train fine-tunes them")
        return True

    def _recompute_blocks(self, model: nn.Module, input_size: tuple[int, int, int]) -> None:
        setting = self.recipe.run.grad_checkpointing
        if not wants_grad_checkpointing(setting, input_size):
            return
        if enable_grad_checkpointing(model):
            self.log(f"gradient checkpointing: on (run.grad_checkpointing: {setting}, input {input_size[1]}x"
                     f"{input_size[2]})")
        elif setting is True:
            self.log(f"warning: {self.config.model_name} does not support timm's gradient checkpointing; "
                     f"run.grad_checkpointing is ignored")

    def _phases(self, train_teacher: bool) -> list[Phase]:
        phases = []
        if train_teacher:
            phases.append(Phase(0, TEACHER, self.recipe.teacher.train, True))
        for stage in self.recipe.stages:
            phases.append(Phase(len(phases), stage.name, stage, False))
        if not phases:
            raise DidbqError("the recipe declares no stages (and trains no teacher); add at least one under `stages:`")
        return phases

    # ------------------------------------------------------------------ the run

    def execute(self) -> dict[str, Any]:
        if self.context.is_main:
            _write_guard(self.out, self.config.resume, self.config.force)
        self.context.barrier()
        state = self._restore() if self.config.resume else RunState()
        torch.manual_seed(self.recipe.run.seed)
        random.seed(self.recipe.run.seed)
        data = load_data(self.config.data, self.recipe)
        teacher, train_teacher = self._build_teacher(data)
        if self.context.is_main and not self.config.resume:
            self._write_run_files(data)
        phases = self._phases(train_teacher)
        train_set, test_set = datasets_for(data, teacher, self.recipe)
        self._recompute_blocks(teacher, train_set.spec.input_size)  # the students are copies of the teacher
        teacher.to(self.device)
        teacher_file = self.out / "teacher.safetensors"
        if phases[0].trains_teacher and state.phase > 0:
            load_weights(teacher_file, teacher)
        if state.checkpoint is not None:
            torch.set_rng_state(state.checkpoint["torch_rng"])
        student: nn.Module | None = None
        for phase in phases[state.phase:]:
            mid_phase = state.checkpoint if phase.index == state.phase and state.step > 0 else None
            if phase.trains_teacher:
                self._train_phase(phase, teacher, None, train_set, test_set, state, mid_phase)
                if self.context.is_main:
                    save_weights(teacher_file, teacher)
                continue
            if student is None:
                student = self._student(teacher)
                if "teacher" not in state.results and self.context.is_main:
                    state.results["teacher"] = self._evaluate(teacher, test_set)
                    self.log(f"teacher: top-1 {state.results['teacher']['top1']:.2f}%")
                    self._check_teacher(state.results["teacher"]["top1"])
            if mid_phase is None:
                self._start_weights(phase, phases, student)
            kd_teacher = self._kd_teacher(phase, phases, teacher, student)
            self._train_phase(phase, student, kd_teacher, train_set, test_set, state, mid_phase)
        if student is None and self.recipe.stages:  # resumed after the last stage ended, before the final files
            student = self._student(teacher)
            student.load_state_dict(state.checkpoint["model"])
        if self.context.is_main:
            if student is not None:
                _binarize_as(student, self.recipe.stages[-1])
                self._export(student.eval(), state.results)
            write_json(self.out / "results.json", state.results)
            self._plot()
        return state.results

    def _export(self, student: nn.Module, results: dict[str, Any]) -> None:
        """model.safetensors (packed: what didbq.load reads) and report.json (measured from that file). The
        latent weights of the last stage stay in stages/<stage>.safetensors for further training."""
        from didbq.export.format import write_packed
        from didbq.export.loader import MODEL_FILE
        from didbq.report import report_for_file

        run = json.loads((self.out / "run.json").read_text())
        spec = self.recipe.data
        evaluation = transform_spec_for(student, augment="none", input_size=spec.input_size, mean=spec.mean,
                                        std=spec.std)
        extra = {"results": results, "metrics": self._final_metrics(), "class_names": run["class_names"],
                 "data": run["data"], "preprocessing": preprocessing(evaluation)}
        path = write_packed(student, self.out / MODEL_FILE, model_name=run["model_name"],
                            model_args=run["model_args"], recipe=self.recipe, extra=extra)
        write_json(self.out / "report.json", report_for_file(path).as_dict())

    def _final_metrics(self) -> dict[str, dict[str, Any]]:
        """The last logged training record of every phase (step, loss and its parts, lr)."""
        final: dict[str, dict[str, Any]] = {}
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        for record in map(json.loads, lines):
            if "loss" in record:
                final[record["phase"]] = {k: v for k, v in record.items() if k not in ("phase", "images_per_s")}
        return final

    def _start_weights(self, phase: Phase, phases: list[Phase], student: nn.Module) -> None:
        """A stage starts from its init_from stage, else from where the previous stage ended (read back from
        that stage's file, which is bit-identical, so a run resumed at a stage boundary starts the same)."""
        earlier = [p.name for p in phases[: phase.index] if not p.trains_teacher]
        source = phase.stage.init_from or (earlier[-1] if earlier else None)
        if source is not None:
            load_weights(self._stage_file(source), student)

    def _student(self, teacher: nn.Module) -> nn.Module:
        student = copy.deepcopy(teacher)
        conversion = convert(student, self.recipe, example_input=None)
        for warning in conversion.warnings:
            self.log(f"warning: {warning}")
        return student.to(self.device)

    def _kd_teacher(self, phase: Phase, phases: list[Phase], teacher: nn.Module, student: nn.Module) -> nn.Module:
        """The frozen model that teaches this stage: the teacher, or (BiT multi-step) the previous stage."""
        earlier = [p for p in phases[: phase.index] if not p.trains_teacher]
        if phase.stage.teacher == "previous_stage" and earlier:
            previous = copy.deepcopy(student)
            load_weights(self._stage_file(earlier[-1].name), previous)
            _binarize_as(previous, earlier[-1].stage)
            previous.eval()
            return previous.requires_grad_(False)
        return teacher.eval().requires_grad_(False)

    def _stage_file(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.safetensors"

    def _write_run_files(self, data: ImageData) -> None:
        recipe = self.recipe.effective()  # reads back as the same recipe (attention preset resolved)
        write_text(self.out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
        write_json(self.out / "run.json", {
            "model_name": self.config.model_name,
            "model_args": {**self.recipe.model.args, "num_classes": data.num_classes},
            "data": self.config.data,
            "class_names": data.class_names,
            "teacher_checkpoint": str(self.config.teacher_checkpoint) if self.config.teacher_checkpoint else None,
        })

    def _restore(self) -> RunState:
        checkpoint = load_checkpoint(self.out / "checkpoints" / "last.pt")
        if self.context.is_main:
            lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
            write_text(self.metrics_path, "".join(lines[: checkpoint["metrics_lines"]]))
        self.log(f"resuming at phase {checkpoint['phase']}, step {checkpoint['step']}")
        return RunState(checkpoint["phase"], checkpoint["step"], checkpoint, dict(checkpoint["results"]),
                        dict(checkpoint.get("train_seconds", {})))

    # ------------------------------------------------------------------ one phase

    def _steps(self, stage: Stage, train_set: TransformedImages) -> tuple[int, int]:
        return stage_steps(stage, len(train_set), self.recipe.data.batch_size)

    def _train_phase(self, phase: Phase, model: nn.Module, kd_teacher: nn.Module | None,
                     train_set: TransformedImages, test_set: TransformedImages, state: RunState,
                     resume: dict[str, Any] | None) -> None:
        stage, recipe, context = phase.stage, self.recipe, self.context
        global_batch = recipe.data.batch_size
        if global_batch % context.world:
            raise DidbqError(f"data.batch_size {global_batch} does not split over {context.world} processes")
        per_epoch, total = self._steps(stage, train_set)
        if not phase.trains_teacher:
            _binarize_as(model, stage)
        optimizer = build_optimizer(model, stage.optimizer, global_batch)
        schedule = build_schedule(optimizer, stage.schedule, total)
        start = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["torch_rng"])
            start = resume["step"]
        elif not phase.trains_teacher and stage.activations == "binary":
            calibrate(model, train_set, global_batch, self.recipe.run.seed, self.device)
        model.train()
        trained = DistributedDataParallel(model, find_unused_parameters=True) if context.active else model
        taps = self._taps(model, kd_teacher, stage)
        latent_weights = latent_binary_weights(model) if stage.loss.weight_regularization else None
        use_amp = self.device.type == "cuda" and recipe.run.amp
        progress = _Progress(self.log, phase.name, total, start, global_batch,
                             enabled=context.is_main and self.config.progress)
        window_start, window_images = time.perf_counter(), 0
        clock = _PhaseClock(state.seconds, phase.name)
        loader = None
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if loader is None or index == 0:
                loader = self._loader(train_set, epoch, index, context)
            images, labels = next(loader)
            images, labels = images.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                teacher_logits = None
                if kd_teacher is not None and stage.loss.kd_weight:
                    with torch.no_grad():
                        teacher_logits = _logits(kd_teacher(images)).float()
                logits = _logits(trained(images)).float()
                loss, parts = total_loss(stage.loss, logits, teacher_logits, labels, *taps, latent_weights)
            global_loss = context.mean(loss.detach())
            if not torch.isfinite(global_loss):
                raise DidbqError(f"{phase.name}: the loss became {float(global_loss)} at step {step}; the last good "
                                 f"checkpoint is {self.out / 'checkpoints' / 'last.pt'} (resume with a lower lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stage.optimizer.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), stage.optimizer.clip_grad_norm)
            optimizer.step()
            schedule.step()
            window_images += global_batch
            done = step + 1
            progress.update(done, float(global_loss))
            if context.is_main and (done % recipe.run.log_every == 0 or done == total):
                elapsed = time.perf_counter() - window_start
                self._metric({"phase": phase.name, "step": done, "epoch": epoch, "loss": float(global_loss),
                              **parts, "lr": schedule.get_last_lr()[0], "images_per_s": window_images / elapsed})
                window_start, window_images = time.perf_counter(), 0
            if done % recipe.run.checkpoint_every == 0 and done < total:
                clock.record()
                self._checkpoint(phase.index, done, model, optimizer, schedule, state)
        clock.record()
        progress.close()
        for tap in taps:
            if tap is not None:
                for side in tap:
                    side.remove()
        self._finish_phase(phase, model, test_set, state, total / per_epoch)

    def _taps(self, model: nn.Module, kd_teacher: nn.Module | None, stage: Stage) -> tuple:
        loss = stage.loss
        features = attention = None
        if loss.features is not None and kd_teacher is not None:
            features = (Taps(model, loss.features, False), Taps(kd_teacher, loss.features, False))
        if loss.attention_maps is not None and kd_teacher is not None:
            attention = (Taps(model, loss.attention_maps, True, loss.attention_of),
                         Taps(kd_teacher, loss.attention_maps, True, loss.attention_of))
        return features, attention

    def _loader(self, train_set: TransformedImages, epoch: int, start_batch: int, context: Distributed):
        train_set.set_epoch(epoch)
        order = epoch_order(len(train_set), epoch, self.recipe.run.seed)
        batches = batches_for_rank(order, self.recipe.data.batch_size, context.rank, context.world)
        loader = DataLoader(train_set, batch_sampler=batches[start_batch:], num_workers=self.recipe.data.workers)
        return iter(loader)

    def _finish_phase(self, phase: Phase, model: nn.Module, test_set: TransformedImages, state: RunState,
                      epochs: float) -> None:
        if self.context.is_main:
            result = {**self._evaluate(model, test_set), "train_s": state.seconds[phase.name], "epochs": epochs}
            state.results[phase.name] = result
            self._metric({"phase": phase.name, "event": "eval", **result})
            self.log(f"{phase.name}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                     f"({result['train_s']:.0f} s training)")
            if not phase.trains_teacher:
                save_weights(self._stage_file(phase.name), model)
            elif not self.recipe.stages:  # a teacher-only recipe: no student phase will look at it
                self._check_teacher(result["top1"])
        self._checkpoint(phase.index + 1, 0, model, None, None, state)

    def _check_teacher(self, top1: float) -> None:
        """A weak teacher bounds every student distilled from it: say so, and what to change."""
        floor = self.recipe.teacher.min_top1
        if top1 < floor:
            fix = ("train it longer (teacher.train.epochs or steps)" if self.recipe.teacher.train is not None
                   else "give a better --teacher-checkpoint")
            self.log(f"warning: the teacher's top-1 {top1:.2f}% is below teacher.min_top1 {floor:g}%: the students "
                     f"learn from it; {fix}")

    def _evaluate(self, model: nn.Module, test_set: TransformedImages) -> dict[str, float]:
        return evaluate(model, test_set, self.recipe.data.eval_batch_size, self.device)

    def _checkpoint(self, phase: int, step: int, model: nn.Module, optimizer, schedule, state: RunState) -> None:
        if self.context.is_main:
            lines = len(self.metrics_path.read_text().splitlines()) if self.metrics_path.exists() else 0
            save_checkpoint(self.out / "checkpoints" / "last.pt", {
                "phase": phase, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": schedule.state_dict() if schedule is not None else None,
                "torch_rng": torch.get_rng_state(), "metrics_lines": lines, "results": state.results,
                "train_seconds": state.seconds})
        self.context.barrier()

    def _metric(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        from didbq.train.plot import plot_curves

        plot_curves(self.metrics_path, self.out / "curves.png")


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def stage_steps(stage: Stage, images: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, the stage's steps): its steps, or its epochs of `images` but at least its min_steps."""
    per_epoch = images // batch_size
    if per_epoch == 0:
        raise DidbqError(f"the batch size {batch_size} is larger than the {images} training images; lower "
                         f"data.batch_size")
    if stage.steps is not None:
        return per_epoch, stage.steps
    return per_epoch, max(1, stage.min_steps or 1, math.ceil(stage.epochs * per_epoch))


def load_data(source: str, recipe: Recipe) -> ImageData:
    """The train and test images of `source` (what `--data` takes), limited as the recipe's `data:` says."""
    spec = recipe.data
    return load_image_data(source, image_column=spec.image_column, label_column=spec.label_column,
                           train_limit=spec.train_limit, test_limit=spec.test_limit, seed=recipe.data_seed)


def datasets_for(data: ImageData, model: nn.Module, recipe: Recipe) -> tuple[TransformedImages, TransformedImages]:
    """The training split as the recipe augments it, and the test split as the model evaluates it."""
    spec = recipe.data
    transform = transform_spec_for(model, augment=spec.augment, input_size=spec.input_size, mean=spec.mean,
                                   std=spec.std)
    evaluation = transform_spec_for(model, augment="none", input_size=spec.input_size, mean=spec.mean,
                                    std=spec.std)
    seed = recipe.run.seed
    return (TransformedImages(data.train, data, transform, train=True, seed=seed),
            TransformedImages(data.test, data, evaluation, train=False, seed=seed))


def calibrate(model: nn.Module, train_set: TransformedImages, batch: int, seed: int,
              device: torch.device | str = "cpu") -> None:
    """Data-aware initialisation (BiT scales, attention-probability scales, thresholds started at the mean) from
    the first batch of epoch 0, the same on every rank, before DDP takes over."""
    indices = epoch_order(len(train_set), 0, seed)[:batch].tolist()
    train_set.set_epoch(0)
    images = torch.stack([train_set[i][0] for i in indices]).to(device)
    model.train()
    with torch.no_grad():
        model(images)


def _binarize_as(model: nn.Module, stage: Stage) -> None:
    """Switch the model's binary layers to what `stage` trains: binary or full-precision weights and inputs."""
    set_binarization(model, weights=stage.weights == "binary", activations=stage.activations == "binary")


class _PhaseClock:
    """Training seconds of one phase on top of what earlier sittings spent on it (a resumed run sums them)."""

    def __init__(self, seconds: dict[str, float], name: str) -> None:
        self.seconds, self.name = seconds, name
        self.earlier, self.started = seconds.get(name, 0.0), time.perf_counter()

    def record(self) -> None:
        self.seconds[self.name] = self.earlier + time.perf_counter() - self.started


class _Progress:
    """A rich progress bar on a terminal; a line every tenth of the phase otherwise (CI logs stay short)."""

    def __init__(self, log: Log, name: str, total: int, start: int, batch: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from didbq.cli import console

        self.log, self.name, self.total, self.enabled = log, name, total, enabled
        self.interactive = enabled and console.is_terminal
        self.started = time.perf_counter()
        self.start, self.batch = start, batch
        if self.interactive:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} img/s"),
                                TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(name, total=total, completed=start, loss=float("nan"), rate=0.0)
            self.bar.start()

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        seconds = time.perf_counter() - self.started
        rate = (done - self.start) * self.batch / max(seconds, 1e-9)
        if self.interactive:
            self.bar.update(self.task, completed=done, loss=loss, rate=rate)
        elif done == self.total or done % max(1, self.total // 10) == 0:
            self.log(f"{self.name}: step {done}/{self.total}  loss {loss:.4f}  {rate:.0f} img/s  ({seconds:.0f} s)")

    def close(self) -> None:
        if self.interactive:
            self.bar.stop()


def binarize(config: BinarizeConfig, recipe: Recipe, context: Distributed, log: Log = print) -> dict[str, Any]:
    """Run (or resume) a whole binarization; returns the accuracy of the teacher and of every stage."""
    if recipe.run.deterministic and context.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if recipe.run.retain_freed_memory:
        retain_freed_memory()
    return Run(config, recipe, context, log).execute()
