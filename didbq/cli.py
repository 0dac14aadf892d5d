"""The `didbq` command line: parses, calls the library, prints. Errors a user can fix exit with code 2."""
from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import click
from rich.console import Console
from rich.table import Table

from didbq.compat import DEFAULT_TIMEOUT
from didbq.errors import DidbqError

console = Console(width=None if sys.stdout.isatty() else 150)
errors = Console(stderr=True)


RUNTIME_CHOICES = ("auto", "packed", "reference")
RUNTIME_HELP = ("packed: popcount kernels on packed weights; reference: the float path; auto: packed where the "
                "kernels build here, else the float path with a warning.")
RECIPE_VARIANTS = (" NAME[key=value,...] changes fields without a new file: 'didb[hfsc=off]' (attention), "
                   "'didb[linear.shortcut=false]', 'didb[into.MLP activation=rprelu]', 'didb[stages=two]'.")


def _parse_model_args(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs for timm.create_model; values are parsed as YAML scalars (ints, floats, bools)."""
    import yaml

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--model-arg")
        parsed[key] = yaml.safe_load(value)
    return parsed


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="didbq")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """didbq: turn any timm Vision Transformer into a binary (W1A1) network with the DIDB-ViT method.

    Start with `didbq plan <model> --recipe didb` to see what a recipe does to a model.
    """


@cli.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--recipe", "-r", default="didb", show_default=True,
              help="Recipe file, or a built-in recipe name (didb, xnor, bit, reactnet)." + RECIPE_VARIANTS)
@click.option("--model-arg", "-m", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model argument on top of the recipe's model.args, e.g. -m img_size=160 "
                   "-m num_classes=10 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
@click.option("--layers", is_flag=True, help="Also print the cost of every layer and attention product.")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Fail on attention classes didbq does not know (--no-strict: binarize their linears only).")
@click.option("--strict-rules", is_flag=True, help="Fail when a recipe rule matches no module (default: warn).")
def plan(model_name: str, recipe: str, model_arg: tuple[str, ...], as_json: bool, layers: bool, strict: bool,
         strict_rules: bool) -> None:
    """Dry run: build MODEL (no weights needed), apply the recipe, run one forward pass, and report every
    replaced and full-precision module, parameters per bit width, packed size and BOPs / FLOPs / OPs."""
    import didbq

    recipe_obj = didbq.load_recipe(recipe)
    arguments = {**recipe_obj.model.args, **_parse_model_args(model_arg)}  # the recipe's model.args, then -m
    model_name = _timm_name(model_name)
    model = didbq.build_model(model_name, pretrained=False, **arguments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = didbq.plan(model, recipe_obj, strict=strict, strict_rules=strict_rules, model_name=model_name)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    _print_plan(result, layers)


@cli.command()
@click.argument("model_name", metavar="MODEL", required=False)
@click.option("--recipe", "-r", default=None, help="Recipe file or built-in name (default: didb; on --resume: the "
                                                  "run's own recipe)." + RECIPE_VARIANTS)
@click.option("--data", "-d", default=None,
              help="Dataset: fashion-mnist, digits, a local image folder or parquet/arrow file, or a Hugging Face "
                   "hub name (needs a network). Default: the recipe's data.source.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: runs/<model>-<recipe>, numbered -2, -3, ... when it exists.")
@click.option("--teacher-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Full-precision teacher weights (safetensors, or a torch state dict read with weights_only).")
@click.option("--resume", "resume", type=click.Path(path_type=Path), default=None, metavar="RUN",
              help="Continue the run in this folder from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@click.option("--no-progress", is_flag=True, help="No progress bars (log lines only).")
@click.option("--json", "as_json", is_flag=True, help="Print the final accuracies as JSON.")
def binarize(model_name: str | None, recipe: str | None, data: str | None, out: Path | None,
             teacher_checkpoint: Path | None, resume: Path | None, force: bool, device: str, no_progress: bool,
             as_json: bool) -> None:
    """Train a binary student of MODEL on --data: teacher, conversion and the recipe's distillation stages.

    Writes the effective recipe, metrics.jsonl, curves.png, checkpoints, the packed model.safetensors (what
    didbq.load reads) and report.json into --out.
    Runs data-parallel under `torchrun --nproc_per_node N -m didbq binarize ...`.
    """
    import didbq  # noqa: F401  (torchvision guard before timm)
    from didbq.train import distributed

    _quiet_datasets()
    from didbq.train.run_folder import new_run_folder, read_run
    from didbq.train.runner import BinarizeConfig
    from didbq.train.runner import binarize as run_binarize

    if resume is not None:
        run, saved_recipe = read_run(resume)
        model_name, data, out = model_name or run["model_name"], data or run["data"], resume
        recipe_obj = didbq.load_recipe(recipe) if recipe else saved_recipe
        checkpoint = teacher_checkpoint or (Path(run["teacher_checkpoint"]) if run["teacher_checkpoint"] else None)
    else:
        if not model_name:
            raise click.UsageError("missing MODEL (or give --resume RUN)")
        recipe_obj, checkpoint = didbq.load_recipe(recipe or "didb"), teacher_checkpoint
        model_name = _timm_name(model_name)
        recipe_obj = _columns_for(recipe_obj, data)
        data = data or recipe_obj.data.source
        if not data:
            raise click.UsageError(f"missing --data (recipe {recipe_obj.name} names no data.source)")
        if out is None:
            out = new_run_folder(model_name, recipe_obj.name)
            errors.print(f"output: {out}", markup=False, highlight=False, soft_wrap=True)
    context = distributed.setup(device)
    log = (lambda message: errors.print(message, markup=False, highlight=False)) if context.is_main else _quiet
    try:
        config = BinarizeConfig(model_name, data, Path(out), checkpoint, resume is not None, force, not no_progress)
        results = run_binarize(config, recipe_obj, context, log)
    finally:
        distributed.teardown(context)
    if context.is_main:
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            _print_results(results, Path(out))


def _columns_for(recipe: Any, data: str | None) -> Any:
    """The recipe's data.image_column / label_column name columns of its own data.source: --data naming another
    dataset drops them (its columns are detected)."""
    spec = recipe.data
    if data is None or spec.source in (None, data) or (spec.image_column is None and spec.label_column is None):
        return recipe
    return recipe.model_copy(update={"data": spec.model_copy(update={"image_column": None, "label_column": None})})


def _timm_name(name: str) -> str:
    """timm's name for MODEL; a short name's resolution is said on stderr."""
    from didbq.convert.models import resolve_model_name

    resolved = resolve_model_name(name)
    if resolved != name:
        errors.print(f"{name} -> {resolved} (timm's default for the name)", markup=False, highlight=False,
                     soft_wrap=True)
    return resolved


def _quiet_datasets() -> None:
    """datasets' own progress bars would interleave with ours (and with one-line errors)."""
    import datasets

    datasets.disable_progress_bars()


def _quiet(message: str) -> None:
    """Log sink of DDP ranks other than 0."""


def _print_results(results: dict[str, dict[str, float]], out: Path) -> None:
    table = Table(title=f"Test accuracy ({out})", title_justify="left")
    for column in ("model", "top-1 %", "top-5 %"):
        table.add_column(column)
    for name, result in results.items():
        table.add_row(name, f"{result['top1']:.2f}", f"{result['top5']:.2f}")
    console.print(table)


@cli.command(name="eval")
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option("--data", "-d", default=None, help="Dataset (default: the run's own).")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto", show_default=True, help=RUNTIME_HELP)
@click.option("--attention", is_flag=True,
              help="Also measure, per binary attention layer, how many keys each query row keeps in the binary "
                   "attention matrix, how much of the softmax mass they carry, and how often the output's sign is "
                   "the query token's own binary value (about 50% when tokens mix, near 100% when the attention "
                   "passes each token through; on the reference runtime).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate_run(run_folder: Path, data: str | None, runtime: str, attention: bool, as_json: bool) -> None:
    """Top-1 / top-5 of the trained student in RUN_FOLDER on the test split of --data."""
    import didbq  # noqa: F401
    from didbq.train.data import TransformedImages, load_image_data, transform_spec_for

    _quiet_datasets()
    from didbq.train.evaluate import KeptKeys, evaluate
    from didbq.train.run_folder import load_student, read_run

    if attention and runtime == "packed":
        raise DidbqError("--attention measures the binary attention matrix on the reference runtime (the packed "
                         "kernels never form it): drop --runtime packed")
    runtime = "reference" if attention else runtime
    run, recipe = read_run(run_folder)
    model = load_student(run_folder, runtime)
    spec = recipe.data
    images = load_image_data(data or run["data"], image_column=spec.image_column, label_column=spec.label_column,
                             test_limit=spec.test_limit, seed=recipe.data_seed)
    if images.num_classes != len(run["class_names"]):
        raise DidbqError(f"{data}: {images.num_classes} classes, but the model was trained on "
                         f"{len(run['class_names'])}")
    transform = transform_spec_for(model, augment="none", input_size=spec.input_size, mean=spec.mean, std=spec.std)
    kept = KeptKeys(model)
    with kept if attention else contextlib.nullcontext():
        result = evaluate(model, TransformedImages(images.test, images, transform, train=False), spec.eval_batch_size)
    if attention:
        result["attention"] = kept.summary()
    if as_json:
        click.echo(json.dumps({**result, "runtime": _runtime_in_use(runtime)}, indent=2))
        return
    _print_results({f"student ({_runtime_in_use(runtime)})": result}, run_folder)
    if attention:
        _print_kept_keys(result["attention"])


def _print_kept_keys(layers: list[dict[str, Any]]) -> None:
    table = Table(title="Binary attention: keys each query row keeps (A_b != 0)", title_justify="left")
    for column in ("layer", "keys per row", "kept (mean)", "kept %", "rows keeping 1 key %", "softmax mass kept %",
                   "output sign = own value %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in layers:
        own_sign = "–" if layer["own_sign_pct"] is None else f"{layer['own_sign_pct']:.1f}"
        table.add_row(layer["layer"], f"{layer['keys']:.0f}", f"{layer['kept']:.2f}", f"{layer['kept_pct']:.1f}",
                      f"{layer['single_key_rows_pct']:.1f}", f"{layer['mass_kept_pct']:.1f}", own_sign)
    console.print(table if layers else "no binary attention layer (softmax attention or none converted)")


@cli.command()
@click.argument("target", metavar="[RUN_OR_MODEL]", required=False)
@click.option("--recipe", "-r", default=None,
              help="With MODEL: recipe file or built-in name (default: didb). A run carries its own." + RECIPE_VARIANTS)
@click.option("--model-arg", "-m", multiple=True, metavar="KEY=VALUE",
              help="With MODEL: timm.create_model argument on top of the recipe's model.args (repeatable).")
@click.option("--fp16", is_flag=True, help="With MODEL: measure the file with its full-precision parts in fp16.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="PNG",
              help="Also write a chart of where the bits and the OPs go, per block.")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="With MODEL: fail on attention classes didbq does not know.")
def report(target: str | None, recipe: str | None, model_arg: tuple[str, ...], fp16: bool, as_json: bool,
           plot: Path | None, strict: bool) -> None:
    """Size and cost report of a trained model (a run folder or a packed .safetensors file; without an argument
    the newest run under ./runs), measured from the file, or of MODEL under --recipe before any training: per
    layer and in total, precision, parameters per bit width, bytes, BOPs / FLOPs / OPs, what stays full
    precision and why, and the checks (file size against the analytic size, FP FLOPs against
    torch.utils.flop_counter)."""
    import didbq  # noqa: F401  (torchvision guard before timm)
    from didbq.report import plot_report, report_for_file, report_for_model

    if target is None:
        from didbq.train.run_folder import newest_run

        target = str(newest_run())
        errors.print(f"reporting {target} (the newest run under ./runs)", markup=False, highlight=False,
                     soft_wrap=True)
    path = Path(target)
    if path.exists():
        if recipe or model_arg or fp16:
            raise click.UsageError("--recipe, --model-arg and --fp16 go with MODEL; a run or packed file carries "
                                   "its own recipe and model arguments")
        result = report_for_file(path)
    elif path.suffix in (".safetensors", ".pt", ".pth", ".bin") or "/" in target:
        raise DidbqError(f"{target}: no such file or run folder")
    else:
        result = report_for_model(_timm_name(target), recipe or "didb", _parse_model_args(model_arg),
                                  fp_dtype="float16" if fp16 else "float32", strict=strict)
    if plot is not None:
        plot_report(result, plot)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    _print_report(result)
    if plot is not None:
        console.print(f"chart: {plot}")


@cli.command()
@click.argument("source", metavar="RUN_OR_FILE", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="File to write.")
@click.option("--format", "form", type=click.Choice(["packed", "float", "hub"]), default="packed",
              show_default=True,
              help="packed: the packed format again (e.g. with --fp16 or --word-bits 32); float: an unpacked "
                   "state dict with binary weights expanded to signs * scale, for inspection; hub: a folder in "
                   "the Hugging Face Hub's layout (model.safetensors, config.json, a model card README.md).")
@click.option("--fp16", is_flag=True, help="Store the floating-point tensors (and scales) in fp16.")
@click.option("--word-bits", type=click.Choice(["8", "32"]), default="8", show_default=True,
              help="packed: 8 signs per uint8 or 32 per int32 word.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
def export(source: Path, out: Path, form: str, fp16: bool, word_bits: str, force: bool) -> None:
    """Write the model of a run folder or packed file in another form (see docs/format.md)."""
    import didbq  # noqa: F401
    from didbq.export.loader import export as export_model

    written = export_model(source, out, format=form, fp_dtype="float16" if fp16 else "float32",
                           word_bits=int(word_bits), force=force)
    size = sum(f.stat().st_size for f in written.rglob("*")) if written.is_dir() else written.stat().st_size
    console.print(f"wrote {written} ({size:,} bytes, {form})")


@cli.command()
@click.argument("source", metavar="RUN_OR_FILE", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repository private.")
def push(source: Path, repo_id: str, private: bool) -> None:
    """Upload the model of RUN_OR_FILE to the Hugging Face Hub model repository ORG/NAME (created if needed):
    the packed model.safetensors, a timm-style config.json and a model card with the measured size, cost and
    accuracies. Needs a network and `huggingface-cli login`; load it back with didbq.load('hf-hub:ORG/NAME')."""
    from didbq.export.hub import push as push_model

    console.print(f"pushed to {push_model(source, repo_id, private)}")


def _runtime_in_use(runtime: str) -> str:
    from didbq.runtime import kernel_name, kernels

    return "reference" if runtime == "reference" or kernels() is None else f"packed, {kernel_name()}"


@cli.command()
@click.argument("source", metavar="RUN_OR_FILE", type=click.Path(path_type=Path))
@click.argument("images", metavar="IMAGE_OR_FOLDER...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", type=int, default=5, show_default=True, help="Classes listed per image.")
@click.option("--batch", "-b", "batch_size", type=int, default=64, show_default=True, help="Images per forward.")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto", show_default=True, help=RUNTIME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def predict(source: Path, images: tuple[Path, ...], top_k: int, batch_size: int, runtime: str,
            as_json: bool) -> None:
    """Class names and probabilities of the model in RUN_OR_FILE for image files and folders (read recursively,
    in batches), with timm's evaluation transform from the run's preprocessing. Unreadable images are reported
    and skipped; the exit code is 2 only if none could be read."""
    from rich.progress import Progress

    import didbq
    from didbq.predict import image_files
    from didbq.predict import predict as run_predict

    model = didbq.load(source, runtime=runtime)
    total = len(image_files(images))
    with Progress(console=errors, transient=True, disable=as_json or total <= batch_size) as progress:
        task = progress.add_task("predicting", total=total)
        result = run_predict(model, images, top_k, batch_size, lambda n: progress.advance(task, n))
    for image, reason in result.unreadable:
        errors.print(f"skipped {image}: {reason}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        table = Table(title=f"{source}: top-{top_k}", title_justify="left")
        for column in ("image", "class", "probability"):
            table.add_column(column)
        for prediction in result.predictions:
            for rank, (name, probability) in enumerate(prediction.top):
                table.add_row(prediction.image if rank == 0 else "", name, f"{probability:.3f}")
        console.print(table)
    if not result.predictions:
        raise DidbqError(f"none of the {total} images could be read (see above)")


@cli.command()
@click.argument("target", metavar="RUN|FILE|MODEL")
@click.option("--recipe", "-r", default=None, help="With MODEL: recipe file or built-in name (default: didb).")
@click.option("--model-arg", "-m", multiple=True, metavar="KEY=VALUE",
              help="With MODEL: timm.create_model argument on top of the recipe's model.args (repeatable).")
@click.option("--batch", "-b", "batches", multiple=True, type=int, default=(1,), show_default=True,
              help="Batch size (repeatable: --batch 1 --batch 32).")
@click.option("--threads", "-t", type=int, default=None, help="torch threads (default: torch's own setting).")
@click.option("--rounds", type=int, default=10, show_default=True, help="Timed rounds (after 2 warm-up rounds).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def bench(target: str, recipe: str | None, model_arg: tuple[str, ...], batches: tuple[int, ...],
          threads: int | None, rounds: int, as_json: bool) -> None:
    """Latency of the fp32 timm model, the binary model on the float path and on the packed runtime, side by
    side: alternating rounds in one process, median / min / max, images/s, speed-ups, the bytes of parameters
    each model holds and which kernel ran. TARGET is a run folder, a packed file, or a timm model name
    converted (untrained) by --recipe."""
    import didbq  # noqa: F401  (torchvision guard before timm)
    from didbq.runtime.bench import LABELS, MODELS
    from didbq.runtime.bench import bench as run_bench

    if not Path(target).exists() and "/" not in target and not target.endswith(".safetensors"):
        target = _timm_name(target)
    with console.status("timing ...") if not as_json else _nothing():
        result = run_bench(target, recipe, _parse_model_args(model_arg), tuple(batches), threads, rounds)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']} ({target}): {result['threads']} thread(s), kernel {result['kernel']}, "
                        f"median of {result['rounds']} rounds", title_justify="left")
    for column in ("batch", *(LABELS[name] for name in MODELS), "packed vs fp32", "packed vs float path",
                   "max |packed - float|"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        times = [f"{row[name]['median_ms']:.1f} ms ({row[name]['images_per_s']:.0f}/s)" for name in MODELS]
        table.add_row(str(row["batch"]), *times, f"{row['speedup_packed_vs_fp32']:.2f}x",
                      f"{row['speedup_packed_vs_reference']:.2f}x", f"{row['max_abs_difference']:.2g}")
    console.print(table)
    held = ", ".join(f"{LABELS[name]} {result['held_bytes'][name] / 2**20:.2f} MiB" for name in MODELS)
    console.print(f"parameters held: {held}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@cli.command()
@click.argument("study_file", metavar="STUDY.yaml", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Study folder: one run folder each, and the table (results.md, results.json).")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run only these students (student or run names; repeat or comma-separate). The teacher always "
                   "comes first; the table lists every finished run.")
@click.option("--record", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Also write the table to DIR after every run (e.g. docs/studies/NAME, committed), and skip the "
                   "runs recorded there with the same settings: a study continues on a new machine from its "
                   "committed table. DIR keeps the teacher's weights too (teacher.safetensors, checked against "
                   "the recorded sha256), so the missing students distill from them without training it again.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@click.option("--no-progress", is_flag=True, help="No progress bars (log lines only).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def study(study_file: Path, out: Path, only: tuple[str, ...], record: Path | None, device: str, no_progress: bool,
          as_json: bool) -> None:
    """Run a study: one full-precision teacher, then students from several recipes on the same budget (same
    teacher, data, epochs, batch), and a table of top-1, gap to the teacher, packed size, BOPs / FLOPs / OPs and
    train time per epoch. Finished runs are skipped and stopped ones resumed: run it again to continue."""
    import didbq  # noqa: F401  (torchvision guard before timm)

    _quiet_datasets()
    from didbq.study import TABLE_MARKDOWN, run_study

    names = [name.strip() for value in only for name in value.split(",") if name.strip()]
    table = run_study(study_file, out, names, device=device, progress=not no_progress,
                      log=lambda message: errors.print(message, markup=False, highlight=False), record=record)
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    _print_study(table)
    console.print(f"table: {out / TABLE_MARKDOWN}")


def _print_study(table: dict[str, Any]) -> None:
    from didbq.study import COLUMNS, SEED_COLUMNS

    for title, columns, rows in ((f"Study {table['study']}", COLUMNS, [table["teacher"], *table["students"]]),
                                 ("Several seeds", SEED_COLUMNS, table["seeds"])):
        if rows:
            view = Table(title=title, title_justify="left")
            for header, _ in columns:
                view.add_column(header)
            for row in rows:
                view.add_row(*(cell(row) for _, cell in columns))
            console.print(view)


@cli.command()
@click.argument("patterns", metavar="[PATTERN]...", nargs=-1)
@click.option("--all", "all_architectures", is_flag=True,
              help="Every timm architecture with attention (decided on the meta device), or those among PATTERNs.")
@click.option("--recipe", "-r", default="didb", show_default=True, help="Recipe file or built-in name." + RECIPE_VARIANTS)
@click.option("--max-params", type=float, default=None, metavar="N",
              help="Skip models with more than N parameters (120e6), counted on the meta device; listed as skipped.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds per model (child process); models at 1024 px take 5 to 12 minutes on 2 cores.")
@click.option("--threads", "-t", type=int, default=None, help="torch threads per child (default 1).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:1.")
@click.option("--per-process", type=int, default=1, show_default=True,
              help="Models a child process checks before a fresh one starts (more saves the ~3-5 s timm import "
                   "per model; 1 isolates every model).")
@click.option("--in-process", is_flag=True, help="Check the models in this process (no timeout; a crash ends it).")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix as one JSON document.")
@click.option("--markdown", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Also write the matrix as markdown (versions, recipe, date, totals per family, per model).")
@click.option("--record", type=click.Path(path_type=Path), default=None, metavar="FILE.jsonl",
              help="Append each result to FILE as it comes; models already in FILE are not checked again (run the "
                   "same command again to continue a stopped matrix).")
def compat(patterns: tuple[str, ...], all_architectures: bool, recipe: str, max_params: float | None,
           timeout: float, threads: int | None, device: str, per_process: int, in_process: bool, as_json: bool,
           markdown: Path | None, record: Path | None) -> None:
    """Which timm models convert, train and stay binary under --recipe. PATTERNs are timm names or fnmatch
    patterns as in timm.list_models ('levit_*'). Each model is built with pretrained=False at its default input
    size, converted (strict), trained one step on a random batch of 2 (finite gradients on every binary layer's
    latent weight), and checked: every layer the recipe made binary still has 1-bit weights and inputs, and every
    binary layer and attention core runs. Each model runs in a child process with --timeout.

    Exit code: 0 when every checked model converts, trains and stays binary (models skipped by --max-params do
    not count), 1 otherwise, 2 on a usage error (a pattern matching no model, an unknown recipe).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import didbq  # noqa: F401  (torchvision guard before timm)
    from didbq.compat import run_compat, select_models, write_markdown
    from didbq.convert import load_recipe

    load_recipe(recipe)  # a bad recipe is a usage error before anything runs
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=errors, transient=True,
                  disable=as_json or not errors.is_terminal) as progress:
        scan = progress.add_task("finding architectures with attention", total=None, visible=all_architectures)
        names = select_models(patterns, all_architectures,
                              lambda done, total: progress.update(scan, completed=done, total=total))
        progress.update(scan, visible=False)
        task = progress.add_task("checking", total=len(names))

        def advance(name: str, result: Any) -> None:
            progress.update(task, description=name, advance=0 if result is None else 1)

        report = run_compat(names, recipe, max_params=max_params, timeout=timeout, threads=threads, device=device,
                            isolate=not in_process, per_process=per_process, progress=advance, record=record)
    if markdown is not None:
        write_markdown(report, markdown)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_compat(report)
        if markdown is not None:
            console.print(f"markdown: {markdown}")
    if not report.ok:
        sys.exit(1)


def _print_compat(report) -> None:  # noqa: ANN001 (didbq.compat.CompatReport, imported lazily)
    from didbq.compat import VIT_FAMILIES, note_of, pass_rate

    def mark(value: bool, skipped: bool) -> str:
        return "-" if skipped else "[green]yes[/]" if value else "[red]no[/]"

    models = Table(title=f"timm {report.timm_version}, torch {report.torch_version}, recipe {report.recipe}, "
                         f"{report.device}: {report.seconds:.0f} s", title_justify="left")
    for column in ("model", "family", "params (M)", "converts", "trains", "binary", "s", "convert s",
                   "attention (modules, route)", "reason or note"):
        models.add_column(column, justify="right" if column in ("params (M)", "s", "convert s") else "left",
                          no_wrap=column == "model", overflow="fold")
    for r in report.results:
        kept = Counter(k["type"] for k in r.kept_attention)
        attention = [f"{a['modules']} {a['route']} ({a['family']})" for a in r.attention]
        attention += [f"{n} {kind} kept full precision" for kind, n in kept.items()]
        models.add_row(r.model, r.family, "?" if r.parameters is None else f"{r.parameters / 1e6:.1f}",
                       mark(r.converts, r.skipped), mark(r.trains, r.skipped), mark(r.binary, r.skipped),
                       f"{r.seconds:.1f}", "-" if r.convert_seconds is None else f"{r.convert_seconds:.2f}",
                       ", ".join(attention), note_of(r))
    console.print(models, markup=True, highlight=False)
    families = Table(title="Per family", title_justify="left")
    for column in ("family", "models", "checked", "converts", "trains", "binary", "pass", "skipped"):
        families.add_column(column, justify="left" if column == "family" else "right")

    def add(label: str, t: dict[str, Any]) -> None:
        families.add_row(label, *(str(t[k]) for k in ("models", "checked", "converts", "trains", "binary")),
                         f"{t['ok']} ({pass_rate(t)})", str(t["skipped"]))

    for family, totals in report.families().items():
        add(f"[bold]{family}[/]" if family in VIT_FAMILIES else family, totals)
    families.add_section()
    add("ViT families", report.vit_total())
    add("total", report.total())
    console.print(families)


@cli.command()
def recipes() -> None:
    """List the built-in recipes, attention variants and the attention classes with their own adapter."""
    from didbq.convert.adapters import supported_families
    from didbq.convert.recipe import BUILTIN_RECIPES, load_recipe
    from didbq.nn.attention import ATTENTION_VARIANTS

    table = Table(title="Built-in recipes (use the name or copy the file)")
    for column in ("name", "file", "attention", "description"):
        table.add_column(column)
    for path in sorted(BUILTIN_RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)
        table.add_row(recipe.name, str(path), recipe.attention.variant, recipe.description.strip())
    console.print(table)
    console.print(f"attention variants: {', '.join(ATTENTION_VARIANTS.names())}")
    console.print("attention: any timm class whose forward calls F.scaled_dot_product_attention or computes "
                  f"softmax(q kᵀ) v (see `didbq compat`); per-class adapters: {', '.join(supported_families())}")


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _grouped(rows: Iterable[tuple[str, tuple]]) -> list[tuple[str, tuple, int]]:
    """Rows keyed by module name collapsed into name patterns (blocks.*.attn.qkv) with a count."""
    counts: Counter = Counter()
    order: OrderedDict = OrderedDict()
    for name, values in rows:
        key = (_pattern(name), values)
        counts[key] += 1
        order.setdefault(key, None)
    return [(pattern, values, counts[(pattern, values)]) for pattern, values in order]


def _print_plan(result, layers: bool) -> None:  # noqa: ANN001 (didbq.convert.Plan, imported lazily)
    console.print(f"[bold]{result.model_name}[/] input {tuple(result.input_size)}, recipe [bold]{result.recipe.name}[/]")
    swapped = Table(title="Replaced modules", title_justify="left")
    for column in ("modules", "count", "type", "into", "rule", "note"):
        swapped.add_column(column)
    for pattern, (kind, into, rule, note), count in _grouped(
            (s.name, (s.original_type, s.into, s.rule, s.note)) for s in result.swaps):
        swapped.add_row(pattern, str(count), kind, into, rule, note)
    console.print(swapped)

    attention = Table(title="Attention cores", title_justify="left")
    for column in ("modules", "count", "class", "family", "route", "variant", "queries x keys", "parts off"):
        attention.add_column(column)
    for pattern, values, count in _grouped(
            (a.name, (a.original_type, a.family, a.route, a.variant, f"{a.queries} x {a.keys}",
                      ", ".join(a.disabled_parts) or "-")) for a in result.attention):
        attention.add_row(pattern, str(count), *values)
    console.print(attention)

    console.print(_kept_table(result))

    if layers:
        console.print(_layers_table(result.layers))

    console.print(_totals_table(result.totals))
    for warning in result.warnings:
        errors.print(f"[yellow]warning:[/] {warning}")


def _layers_table(layers) -> Table:  # noqa: ANN001 (list of didbq.report.LayerCost)
    """Per layer and attention product: precision, parameters per bit width, bytes, BOPs, FLOPs and OPs."""
    costs = Table(title="Cost per layer (per image; bytes as packed, FP parts fp32)", title_justify="left")
    numeric = ("1-bit params", "FP params", "bytes", "MACs", "BOPs", "FLOPs", "OPs")
    for column in ("layer", "weights", "inputs", *numeric):
        costs.add_column(column, justify="right" if column in numeric else "left")
    for layer in layers:
        costs.add_row(layer.name, layer.weights, layer.inputs, f"{layer.binary_parameters:,}",
                      f"{layer.fp_parameters:,}", f"{layer.bytes:,}", f"{layer.macs:,}", f"{layer.bops:,}",
                      f"{layer.flops:,}", f"{layer.ops:,.0f}")
    return costs


def _print_report(report) -> None:  # noqa: ANN001 (didbq.report.Report, imported lazily)
    plan = report.plan
    source = "analytic, before training" if report.source == "analytic" else report.source
    console.print(f"[bold]{plan.model_name}[/] input {tuple(plan.input_size)}, recipe [bold]{plan.recipe.name}[/] "
                  f"({source})")
    console.print(_layers_table(plan.layers))
    blocks = Table(title="Per block", title_justify="left")
    numeric = ("1-bit params", "1-bit bytes", "FP bytes", "BOPs", "FLOPs", "OPs")
    for column in ("block", *numeric):
        blocks.add_column(column, justify="right" if column in numeric else "left")
    for b in report.blocks:
        blocks.add_row(b.name, f"{b.binary_parameters:,}", f"{b.binary_bytes:,}", f"{b.fp_bytes:,}", f"{b.bops:,}",
                       f"{b.flops:,}", f"{b.ops:,.0f}")
    console.print(blocks)
    console.print(_kept_table(plan))
    extra = []
    if report.file is not None:
        f = report.file
        extra += [(f"file ({f.fp_dtype} parts): tensors measured", f"{f.payload_bytes:,} B vs {f.analytic_bytes:,} B "
                   f"analytic ({f.gap:+.2%})"),
                  ("file: header (tensor index, metadata)", f"{f.header_bytes:,} B"),
                  ("file: total", f"{f.file_bytes / 1e6:,.3f} MB ({plan.totals.fp32_bytes / f.file_bytes:.1f}x "
                                  f"smaller than fp32)")]
    if report.flop_check is not None:
        c = report.flop_check
        extra.append(("FP MACs vs torch.utils.flop_counter", f"{c.report_macs:,} vs {c.torch_macs:,} "
                                                               f"({c.gap:+.2%}{'' if c.ok else ', MISMATCH'})"))
    extra += [(f"{stage} top-1 / top-5", f"{r['top1']:.2f}% / {r['top5']:.2f}%") for stage, r in report.results.items()
              if isinstance(r, dict) and "top1" in r]
    console.print(_totals_table(plan.totals, extra))


def _kept_table(result) -> Table:  # noqa: ANN001 (didbq.convert.Plan)
    """Every module that stays full precision, grouped by name pattern, and why."""
    kept = Table(title="Full precision", title_justify="left")
    for column in ("modules", "count", "type", "reason", "parameters"):
        kept.add_column(column)
    grouped: dict[tuple, int] = {}
    counts: Counter = Counter()
    for k in result.kept:
        key = (_pattern(k.name), k.type, k.reason)
        grouped[key] = grouped.get(key, 0) + k.parameters
        counts[key] += 1
    for (pattern, kind, reason), parameters in grouped.items():
        kept.add_row(pattern, str(counts[(pattern, kind, reason)]), kind, reason, f"{parameters:,}")
    return kept


def _totals_table(t, extra: Iterable[tuple[str, str]] = ()) -> Table:  # noqa: ANN001 (didbq.report.Totals)
    summary = Table(title="Totals (per image; OPs = FLOPs + BOPs/64)", title_justify="left", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    for label, value in (
            ("1-bit parameters", f"{t.binary_parameters:,} ({t.binary_share:.1%} of all)"),
            ("full-precision parameters", f"{t.fp_parameters:,}"),
            ("packed size (analytic)", f"{t.packed_bytes / 1e6:,.2f} MB"),
            ("packed size, FP parts in fp16 (analytic)", f"{t.packed_bytes_fp16 / 1e6:,.2f} MB"),
            ("fp32 model (full-precision equivalent)", f"{t.fp32_bytes / 1e6:,.2f} MB"),
            ("compression", f"{t.compression:.1f}x ({t.compression_fp16:.1f}x with fp16 parts)"),
            ("BOPs", f"{t.bops:,}"),
            ("FLOPs", f"{t.flops:,}"),
            ("OPs", f"{t.ops:,.0f} ({t.ops:.3g})"),
            ("full-precision OPs", f"{t.fp_reference_flops:,} ({t.fp_reference_flops:.3g})"),
            ("OPs reduction", f"{t.ops_reduction:.1f}x"),
            *extra):
        summary.add_row(label, value)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for problems a user can fix (--debug shows tracebacks)."""

    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="didbq", standalone_mode=False)
    except click.exceptions.Abort:
        errors.print("aborted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except DidbqError as error:
        if "--debug" in args:
            raise
        errors.print(f"didbq: error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
