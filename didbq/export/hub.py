"""The Hugging Face Hub: a model folder in the Hub's layout (the packed file, a timm-style config.json, a model
card), `push` to a repository, and `download` for didbq.load("hf-hub:ORG/NAME")."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from didbq.errors import DidbqError
from didbq.export.loader import MODEL_FILE, resolve

HUB_PREFIX = "hf-hub:"
CONFIG_FILE, CARD_FILE = "config.json", "README.md"


def hub_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """config.json in timm's style (architecture, num_classes, pretrained_cfg, model_args) plus what didbq
    knows of the model (format, recipe, binarization); didbq.load reads the packed file's own metadata."""
    preprocessing = metadata.get("preprocessing") or {}
    names = metadata.get("class_names") or []
    return {"architecture": metadata["model_name"].split(".")[0], "num_classes": len(names) or None,
            "model_args": metadata["model_args"], "label_names": names or None,
            "pretrained_cfg": {**preprocessing, "num_classes": len(names) or None},
            "didbq": {"format": metadata["format"], "format_version": metadata["format_version"],
                      "didbq_version": metadata.get("didbq_version"), "recipe": metadata["recipe"]["name"],
                      "binarization": metadata["binarization"], "load": "didbq.load(folder or 'hf-hub:ORG/NAME')"}}


def model_card(report: dict[str, Any], metadata: dict[str, Any], repo_id: str | None = None) -> str:
    """The README.md of the Hub folder: what the model is, its size and cost (measured from the file), the
    accuracies of its run, the recipe and how to use it."""
    totals, file = report["totals"], report["file"]
    name, recipe = metadata["model_name"], metadata["recipe"]
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    lines = ["---", "library_name: didbq", "tags: [binary-neural-network, vision-transformer, timm, didbq]",
             "---", "", f"# {name}, binarized with didbq ({recipe['name']})", "",
             f"A 1-bit-weight, 1-bit-activation {name} made with [didbq](https://github.com/) under the recipe "
             f"`{recipe['name']}`: {recipe.get('description', '').strip()}", "",
             "| measure | value |", "|---|---|",
             f"| packed file | {file['file_bytes'] / 1e6:.3f} MB |",
             f"| fp32 model | {totals['fp32_bytes'] / 1e6:.3f} MB ({totals['compression']:.1f}x smaller packed, "
             f"{totals['compression_fp16']:.1f}x with fp16 parts) |",
             f"| 1-bit parameters | {totals['binary_parameters']:,} ({100 * totals['binary_share']:.1f}% of all) |",
             f"| BOPs / FLOPs per image | {totals['bops']:,} / {totals['flops']:,} |",
             f"| OPs per image (FLOPs + BOPs/64) | {totals['ops']:,.0f} ({totals['ops_reduction']:.1f}x fewer) |"]
    results = metadata.get("results") or {}
    if results:
        lines += ["", "| model | top-1 % | top-5 % |", "|---|---:|---:|"]
        lines += [f"| {phase} | {r['top1']:.2f} | {r['top5']:.2f} |" for phase, r in results.items()]
        lines += ["", f"Data: `{metadata.get('data', '?')}`; classes: {', '.join(metadata.get('class_names') or [])}."]
    lines += ["", "## Use", "", "```python", "import didbq", f"model = didbq.load('{where}')   # packed runtime",
              "from didbq.predict import predict", "predict(model, ['image.png'], top_k=3).as_dict()", "```", "",
              "or `didbq predict " + where + " image.png`.", "", "## Recipe", "", "```yaml",
              yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def export_hub(source: Path | str, out: Path | str, force: bool = False, repo_id: str | None = None) -> Path:
    """Write the model of `source` (run folder or packed file) as a Hub folder `out`: model.safetensors (the
    packed file as it is), config.json and README.md. Written under a temporary name, renamed when complete."""
    from didbq.export.format import read_packed
    from didbq.report import report_for_file

    path, out = resolve(source), Path(out)
    if out.exists() and not force:
        raise DidbqError(f"{out} exists; pass --force to overwrite it")
    metadata = read_packed(path).metadata
    report = report_for_file(path).as_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copyfile(path, staging / MODEL_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(hub_config(metadata), indent=2) + "\n")
        (staging / CARD_FILE).write_text(model_card(report, metadata, repo_id))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _require_hub(what: str) -> None:
    from didbq.train.data import hub_problem

    problem = hub_problem()
    if problem is not None:
        raise DidbqError(f"cannot {what}: {problem}; go online (and log in with `huggingface-cli login` to push)")


def push(source: Path | str, repo_id: str, private: bool = False) -> str:
    """Export `source` as a Hub folder and upload it to the model repository `repo_id` (created if needed);
    returns the repository's URL."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1:
        raise DidbqError(f"{repo_id!r}: a Hub repository is ORG/NAME")
    _require_hub(f"push to {repo_id}")
    with tempfile.TemporaryDirectory(prefix="didbq-hub-") as folder:
        staged = export_hub(source, Path(folder) / "model", repo_id=repo_id)
        api = HfApi()
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message="didbq push")
        except Exception as error:  # authentication, permissions, network: one line, cause kept
            raise DidbqError(f"cannot push to {repo_id}: {str(error).splitlines()[0][:200]}") from error
    return str(url)


def download(reference: str) -> Path:
    """The local folder of `hf-hub:ORG/NAME` (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    repo_id = reference.removeprefix(HUB_PREFIX)
    patterns = [MODEL_FILE, CONFIG_FILE, CARD_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache: download, unless the hub is out of reach (fail at once, not retry)
        _require_hub(f"load {reference}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # unknown repository, permissions, network
        raise DidbqError(f"cannot load {reference}: {str(error).splitlines()[0][:200]}") from error
