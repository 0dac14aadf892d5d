"""Backbone compatibility: which timm models convert, train and stay binary under a recipe (`didbq compat`).

For each model: build it with `pretrained=False` at its default input size, `convert` it (strict), take one
training step on a random batch of 2 (calibration pass, forward, cross-entropy on random labels, backward, SGD
step) with the binary layers as the recipe's last stage sets them, require finite gradients on every binary
layer's latent weight, then check that every layer a rule made binary still has 1-bit weights and inputs and that
every binary layer and attention core runs (`check_conversion`). The first stage that fails gives the reason.

`run_compat` runs every model in a child process (spawned; one crash, hang or out-of-memory kill costs that model
only, reported as its reason) with a per-model timeout; `isolate=False` runs them here (tests, notebooks).
"""
from __future__ import annotations

import fnmatch
import gc
import json
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from didbq.errors import DidbqError

# timm modules (families) of the ViTs didbq targets; deit3_* models live in `deit`.
VIT_FAMILIES = ("vision_transformer", "deit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
                "beit", "eva", "cait", "xcit", "pvt_v2", "vision_transformer_relpos", "levit", "twins", "crossvit",
                "mvitv2", "efficientformer", "efficientformer_v2")
DEFAULT_TIMEOUT = 1200.0  # the largest default inputs (sapiens2, 1024x768) took 690 s at 2 threads
STAGES = ("build", "convert", "train", "binary")

Progress = Callable[[str, "CompatResult | None"], None]  # (model, None) when it starts, (model, result) when done


@dataclass
class CompatResult:
    """One model under one recipe. `stage` is the stage that failed (build, convert, train, binary, timeout,
    crash, skipped), None when the model converts, trains and stays binary."""

    model: str
    family: str
    parameters: int | None = None
    converts: bool = False
    trains: bool = False
    binary: bool = False
    stage: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    convert_seconds: float | None = None
    binary_layers: int = 0
    attention: list[dict[str, Any]] = field(default_factory=list)  # {family, route, modules} per route used
    kept_attention: list[dict[str, Any]] = field(default_factory=list)  # {name, type, reason}: full precision
    warnings: list[str] = field(default_factory=list)
    grad_checkpointing: bool = False  # the train step recomputed blocks in backward (run.grad_checkpointing)

    @property
    def ok(self) -> bool:
        return self.converts and self.trains and self.binary

    @property
    def skipped(self) -> bool:
        return self.stage == "skipped"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class CompatReport:
    """The matrix: one result per model, with totals per timm family and overall."""

    results: list[CompatResult]
    recipe: str
    timm_version: str
    torch_version: str
    device: str
    date: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Every checked model converts, trains and stays binary (models skipped by max_params do not count)."""
        return all(r.ok for r in self.results if not r.skipped)

    @property
    def check_seconds(self) -> float:
        """The time of the checks themselves: each model's own seconds, summed (recorded ones included)."""
        return sum(r.seconds for r in self.results)

    def families(self) -> dict[str, dict[str, Any]]:
        grouped: dict[str, list[CompatResult]] = {}
        for result in self.results:
            grouped.setdefault(result.family, []).append(result)
        return {family: _totals(results) for family, results in sorted(grouped.items())}

    def total(self) -> dict[str, Any]:
        return _totals(self.results)

    def vit_total(self) -> dict[str, Any]:
        """The totals over the ViT families (VIT_FAMILIES)."""
        return _totals([r for r in self.results if r.family in VIT_FAMILIES])

    def as_dict(self) -> dict[str, Any]:
        return {"timm": self.timm_version, "torch": self.torch_version, "recipe": self.recipe, "device": self.device,
                "date": self.date, "seconds": round(self.seconds, 2),
                "check_seconds": round(self.check_seconds, 2), "ok": self.ok, "total": self.total(),
                "vit_families": {**self.vit_total(), "families": list(VIT_FAMILIES)},
                "families": self.families(), "models": [r.as_dict() for r in self.results]}

    def markdown(self) -> str:
        return compat_markdown(self)


def _totals(results: Sequence[CompatResult]) -> dict[str, Any]:
    checked = [r for r in results if not r.skipped]
    passing = sum(r.ok for r in checked)
    return {"models": len(results), "checked": len(checked), "skipped": len(results) - len(checked),
            "converts": sum(r.converts for r in checked), "trains": sum(r.trains for r in checked),
            "binary": sum(r.binary for r in checked), "ok": passing,
            "fraction": round(passing / len(checked), 4) if checked else None}


# ------------------------------------------------------------------------------------------ choosing models


def family_of(name: str) -> str:
    """timm's module for the model (`levit_128s` -> `levit`)."""
    import timm

    architecture = timm.models.get_arch_name(name)
    try:
        module = timm.models.model_entrypoint(architecture).__module__
    except (RuntimeError, KeyError):
        return "?"
    return module.rpartition(".")[2]


_META: dict[str, tuple[int | None, bool | None]] = {}


def meta_scan(name: str) -> tuple[int | None, bool | None]:
    """(parameters, whether any module class looks like attention) of `name`, built on the meta device (no
    memory, no weights); (None, None) when timm cannot build it there. Cached per process."""
    if name not in _META:
        import timm
        import torch

        import didbq  # noqa: F401  (torchvision guard before timm)
        from didbq.convert.adapters import ADAPTERS, class_key, looks_like_attention

        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 (any failure: the real build reports it)
            _META[name] = (None, None)
        else:
            classes = {type(m) for m in model.modules()}
            _META[name] = (sum(p.numel() for p in model.parameters()),
                           any(class_key(c) in ADAPTERS or looks_like_attention(c) for c in classes))
    return _META[name]


def architectures_with_attention(max_params: float | None = None, names: Iterable[str] | None = None,
                                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    """timm architectures (`timm.list_models()`, or `names`) with a module class that looks like attention,
    decided on the meta device. Models timm cannot build on the meta device are kept (the real check reports
    them). `max_params` does not drop models here: run_compat skips them with the reason recorded."""
    import timm

    candidates = list(names) if names is not None else timm.list_models()
    found = []
    for index, name in enumerate(candidates):
        _, attention = meta_scan(name)
        if attention is not False:
            found.append(name)
        if progress is not None:
            progress(index + 1, len(candidates))
    return found


def select_models(patterns: Sequence[str], all_architectures: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """timm names for `patterns` (fnmatch wildcards as in timm.list_models; a plain name may be a short name,
    see resolve_model_name); with `all_architectures` every timm architecture with attention, restricted to the
    patterns if any. A pattern that matches nothing is an error naming it."""
    import timm

    from didbq.convert.models import resolve_model_name

    if not patterns and not all_architectures:
        raise DidbqError("name a timm model or pattern ('levit_*'), or give --all")
    every = timm.list_models()
    names: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = fnmatch.filter(every, pattern)
            if not matched:
                raise DidbqError(f"pattern {pattern!r} matches no timm model (timm {timm.__version__})")
            names += matched
        else:
            names.append(resolve_model_name(pattern))
    names = list(dict.fromkeys(names))
    if all_architectures:
        names = architectures_with_attention(names=names or every, progress=progress)
    return names


# ------------------------------------------------------------------------------------------ one model


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = text if isinstance(error, DidbqError) else f"{type(error).__name__}: {text}" if text else \
        type(error).__name__
    return line[:400]


def _loss(outputs: Any, batch: int, generator: Any) -> Any:
    """Cross-entropy on random labels for every [batch, classes] output, the mean of any other tensor output."""
    import torch
    import torch.nn.functional as F

    tensors = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])
               if isinstance(o, torch.Tensor) and o.requires_grad]
    if not tensors:
        raise DidbqError("the model's output does not depend on any trainable parameter")
    total = 0
    for output in tensors:
        if output.dim() == 2 and output.shape[0] == batch:
            labels = torch.randint(output.shape[1], (batch,), generator=generator).to(output.device)
            total = total + F.cross_entropy(output.float(), labels)
        else:
            total = total + output.float().mean()
    return total


def _train_step(model: Any, recipe: Any, example: Any) -> None:
    """One step of what `didbq binarize` does, on random data: the last stage's binarization, a calibration pass
    (data-aware scales), forward, loss, backward, an SGD step. Raises naming the first problem."""
    import torch

    from didbq.nn import BinaryLayer, set_binarization

    if recipe.stages:
        last = recipe.stages[-1]
        set_binarization(model, weights=last.weights == "binary", activations=last.activations == "binary")
    model.train()
    with torch.no_grad():
        model(example)
    model.zero_grad(set_to_none=True)
    loss = _loss(model(example), example.shape[0], torch.Generator().manual_seed(0))
    if not torch.isfinite(loss):
        raise DidbqError(f"the training loss is {loss.item()} on a random batch")
    loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer):
            grad = module.weight.grad
            if grad is None:
                raise DidbqError(f"{name}: no gradient reaches its latent weight")
            if not torch.isfinite(grad).all():
                raise DidbqError(f"{name}: non-finite gradient on its latent weight")
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise DidbqError(f"{bad}: non-finite after one training step")
    model.zero_grad(set_to_none=True)


def _check_binary(model: Any, conversion: Any, example: Any) -> int:
    """After the step: every layer a rule made binary has 1-bit weights and inputs, and every binary layer and
    attention core runs (check_conversion). Returns the number of binary layers."""
    from didbq.convert import check_conversion
    from didbq.nn import BinaryLayer

    layers = 0
    for swap in conversion.swaps:
        module = model.get_submodule(swap.name)
        if not isinstance(module, BinaryLayer):
            continue
        if not module.binarize_weights:
            raise DidbqError(f"{swap.name}: full-precision weights after the training step")
        if not getattr(module, "inputs_binary", True):
            raise DidbqError(f"{swap.name}: full-precision inputs after the training step")
        layers += 1
    if not layers:
        raise DidbqError("no layer became binary (no rule of the recipe matched a layer that runs)")
    model.eval()
    check_conversion(model, example)
    return layers


def _kept_attention(model: Any, conversion: Any) -> list[dict[str, Any]]:
    """Attention-like modules the conversion kept in full precision, with the conversion's reason."""
    from didbq.convert.adapters import ADAPTERS, class_key, looks_like_attention
    from didbq.convert.routing import original_class

    converted = {a.name for a in conversion.attention}
    kept = []
    for entry in conversion.kept:
        if entry.name in converted or entry.name == "(model)":
            continue
        try:
            cls = original_class(model.get_submodule(entry.name))
        except AttributeError:
            continue
        if class_key(cls) in ADAPTERS or looks_like_attention(cls):
            kept.append({"name": entry.name, "type": entry.type, "reason": entry.reason})
    return kept


def _attention_routes(conversion: Any) -> list[dict[str, Any]]:
    counts = Counter((a.family, a.route) for a in conversion.attention)
    return [{"family": family, "route": route, "modules": n} for (family, route), n in counts.items()]


def check_model(name: str, recipe: Any = "didb", *, strict: bool = True, batch: int = 2,
                device: str = "cpu") -> CompatResult:
    """Build, convert, train one step and check one timm model under `recipe` (a name, file or Recipe); never
    raises for a failure of the model (it is the result's stage and reason)."""
    import torch

    import didbq  # noqa: F401  (torchvision guard before timm)
    from didbq.convert import convert, load_recipe
    from didbq.convert.walker import example_input_for
    from didbq.train.recompute import enable_grad_checkpointing, wants_grad_checkpointing

    recipe = load_recipe(recipe)
    result = CompatResult(model=name, family=family_of(name))
    started = time.perf_counter()
    model = conversion = None
    stage = "build"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import timm

            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).to(device)
            result.parameters = sum(p.numel() for p in model.parameters())
            stage = "convert"
            clock = time.perf_counter()
            conversion = convert(model, recipe, strict=strict)
            result.convert_seconds = round(time.perf_counter() - clock, 3)
            result.converts = True
            result.warnings = list(conversion.warnings)
            result.attention = _attention_routes(conversion)
            result.kept_attention = _kept_attention(model, conversion)
            stage = "train"
            example = example_input_for(model, batch)
            if wants_grad_checkpointing(recipe.run.grad_checkpointing, tuple(example.shape[1:])):
                result.grad_checkpointing = enable_grad_checkpointing(model)
            _train_step(model, recipe, example)
            result.trains = True
            stage = "binary"
            result.binary_layers = _check_binary(model, conversion, example)
            result.binary = True
    except Exception as error:  # noqa: BLE001 (any failure of the model is its result)
        result.stage, result.reason = stage, _one_line(error)
    finally:
        del model, conversion
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    result.seconds = round(time.perf_counter() - started, 3)
    return result


# ------------------------------------------------------------------------------------------ many models


def _worker(connection: Any, recipe: str, strict: bool, batch: int, device: str, threads: int) -> None:
    """A child process: check the models the parent sends, one at a time, until it sends None."""
    import torch

    torch.set_num_threads(threads)
    while True:
        name = connection.recv()
        if name is None:
            return
        connection.send(check_model(name, recipe, strict=strict, batch=batch, device=device).as_dict())


class _Children:
    """Spawned worker processes, one at a time: a new one after `per_process` models, a timeout or a crash."""

    def __init__(self, arguments: tuple, per_process: int) -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.arguments, self.per_process = arguments, max(1, per_process)
        self.process = self.connection = None
        self.done = 0

    def _start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, *self.arguments), daemon=True)
        self.process.start()
        child.close()
        self.done = 0

    def check(self, name: str, timeout: float | None) -> CompatResult | tuple[str, str]:
        """The child's result for `name`, or (stage, reason) for a timeout or a crash."""
        if self.process is not None and not self.process.is_alive():
            self.stop(kill=True)
        if self.process is None:
            self._start()
        self.connection.send(name)
        if not self.connection.poll(timeout):
            self.stop(kill=True)
            return "timeout", f"timeout: no result after {timeout:g} s"
        try:
            data = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            self.stop(kill=True)
            signal = f" (signal {-code}{', out of memory?' if code == -9 else ''})" if code and code < 0 else ""
            return "crash", f"the child process died with exit code {code}{signal}"
        self.done += 1
        if self.done >= self.per_process:
            self.stop()
        data.pop("ok", None)
        return CompatResult(**data)

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if not kill:
            try:
                self.connection.send(None)
                self.process.join(30)
            except (BrokenPipeError, OSError):
                pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.connection.close()
        self.process = self.connection = None


def run_compat(names: Sequence[str], recipe: Any = "didb", *, strict: bool = True, max_params: float | None = None,
               timeout: float | None = DEFAULT_TIMEOUT, threads: int | None = None, device: str = "cpu",
               batch: int = 2, isolate: bool = True, per_process: int = 1,
               progress: Progress | None = None, record: str | Path | None = None) -> CompatReport:
    """Check every model of `names` (timm names) under `recipe` (a built-in name, file or Recipe; validated here
    first).

    isolate: each model in a spawned child process (a new one every `per_process` models, and after a timeout or
    a crash), `timeout` seconds each (None: no limit), `threads` torch threads (default 1). isolate=False checks
    them in this process (no timeout, this process's threads). Models over `max_params` parameters (counted on
    the meta device) are skipped with the reason recorded. record: a JSON-lines file that gets each result as
    it comes; models already in it are taken from it, not checked again (a stopped matrix resumes)."""
    import timm
    import torch

    from didbq.convert import load_recipe

    recipe_name = load_recipe(recipe).name  # validated before any model; a Recipe goes to the children pickled
    if isinstance(recipe, str) and recipe != recipe_name:
        recipe_name = f"{recipe_name} ({recipe})"
    started = time.perf_counter()
    recorded = read_record(record) if record is not None else {}
    children = _Children((recipe, strict, batch, device, threads or 1), per_process) if isolate else None
    results = []
    try:
        for name in names:
            if progress is not None:
                progress(name, None)
            result = recorded.get(name) or _skip(name, max_params)
            if result is None and children is None:
                result = check_model(name, recipe, strict=strict, batch=batch, device=device)
            elif result is None:
                clock = time.perf_counter()
                outcome = children.check(name, timeout)
                if isinstance(outcome, tuple):
                    parameters, _ = meta_scan(name) if max_params is not None else (None, None)
                    result = CompatResult(name, family_of(name), parameters, stage=outcome[0], reason=outcome[1],
                                          seconds=round(time.perf_counter() - clock, 3))
                else:
                    result = outcome
            results.append(result)
            if record is not None and name not in recorded:
                _append_record(record, result)
            if progress is not None:
                progress(name, result)
    finally:
        if children is not None:
            children.stop()
    return CompatReport(results, recipe_name, timm.__version__, torch.__version__, device,
                        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter() - started)


def read_record(path: str | Path) -> dict[str, CompatResult]:
    """The results a `record` file holds, by model (an absent file holds none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            data.pop("ok", None)
            results[data["model"]] = CompatResult(**data)
    return results


def _append_record(path: str | Path, result: CompatResult) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(result.as_dict()) + "\n")


def _skip(name: str, max_params: float | None) -> CompatResult | None:
    if max_params is None:
        return None
    parameters, _ = meta_scan(name)
    if parameters is None or parameters <= max_params:
        return None
    return CompatResult(name, family_of(name), parameters, stage="skipped",
                        reason=f"{parameters / 1e6:,.1f} M parameters > max_params {max_params / 1e6:,.1f} M")


# ------------------------------------------------------------------------------------------ markdown


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _mark(value: bool, skipped: bool) -> str:
    return "-" if skipped else "yes" if value else "**no**"


def pass_rate(totals: dict[str, Any]) -> str:
    """The pass rate, with one decimal where a whole percent would round a miss up to 100%."""
    fraction = totals["fraction"]
    if fraction is None:
        return "-"
    return f"{fraction:.0%}" if fraction in (0, 1) or f"{fraction:.0%}" != "100%" else f"{fraction:.1%}"


def attention_summary(result: CompatResult) -> str:
    """'12 sdpa (vision_transformer/deit/deit3)'-style text of the routes a model's attention took."""
    return ", ".join(f"{a['modules']} {a['route']} ({a['family']})" for a in result.attention)


def kept_summary(result: CompatResult) -> str:
    counts = Counter((k["type"], k["reason"]) for k in result.kept_attention)
    return "; ".join(f"{n} {kind}: {reason}" for (kind, reason), n in counts.items())


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def note_of(result: CompatResult) -> str:
    """The reason a model failed, or what its check needed to pass."""
    if result.reason:
        return result.reason
    return "trained with gradient checkpointing (run.grad_checkpointing)" if result.grad_checkpointing else ""


def compat_markdown(report: CompatReport) -> str:
    """The matrix as markdown (docs/compat.md): versions, recipe, date, run time, totals per family, per model."""
    total, vit = report.total(), report.vit_total()
    lines = [
        f"# Backbone compatibility: recipe `{report.recipe}`", "",
        f"timm {report.timm_version}, torch {report.torch_version}, device {report.device}, {report.date}, "
        f"run time {_duration(report.seconds)}; the checks took {_duration(report.check_seconds)} in all (each "
        f"model's own time, summed over every run recorded: a resumed matrix counts its earlier runs). "
        f"Generated by `didbq compat`.", "",
        "A model **converts** (`convert`, strict), **trains** (one step on a random batch of 2: finite loss, finite "
        "gradients on every binary layer's latent weight) and **stays binary** (after the step every layer a rule "
        "made binary has 1-bit weights and inputs, and every binary layer and attention core runs).", "",
        f"Overall: {total['ok']} of {total['checked']} checked models pass ({pass_rate(total)}), "
        f"{total['skipped']} skipped. ViT families: {vit['ok']} of {vit['checked']} ({pass_rate(vit)}).", "",
        "## Per family", "",
        "| family | models | checked | converts | trains | binary | pass | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family, t in report.families().items():
        name = f"**{family}**" if family in VIT_FAMILIES else family
        lines.append(f"| {name} | {t['models']} | {t['checked']} | {t['converts']} | {t['trains']} | {t['binary']} | "
                     f"{t['ok']} ({pass_rate(t)}) | {t['skipped']} |")
    lines.append(f"| total | {total['models']} | {total['checked']} | {total['converts']} | {total['trains']} | "
                 f"{total['binary']} | {total['ok']} ({pass_rate(total)}) | {total['skipped']} |")
    lines += ["", "## Per model", "",
              "| model | family | params (M) | converts | trains | binary | seconds | convert s | attention | "
              "full-precision attention | reason or note |",
              "|---|---|---:|---|---|---|---:|---:|---|---|---|"]
    for r in report.results:
        params = "?" if r.parameters is None else f"{r.parameters / 1e6:.1f}"
        convert_s = "-" if r.convert_seconds is None else f"{r.convert_seconds:.2f}"
        lines.append(f"| {r.model} | {r.family} | {params} | {_mark(r.converts, r.skipped)} | "
                     f"{_mark(r.trains, r.skipped)} | {_mark(r.binary, r.skipped)} | {r.seconds:.1f} | {convert_s} | "
                     f"{_cell(attention_summary(r))} | {_cell(kept_summary(r))} | {_cell(note_of(r))} |")
    return "\n".join(lines) + "\n"


def write_markdown(report: CompatReport, path: str | Path) -> Path:
    """Write compat_markdown(report) to `path` (through a temporary name)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(compat_markdown(report))
    partial.replace(path)
    return path


__all__ = ["VIT_FAMILIES", "CompatReport", "CompatResult", "architectures_with_attention", "check_model",
           "compat_markdown", "family_of", "meta_scan", "pass_rate", "run_compat", "select_models",
           "write_markdown"]
