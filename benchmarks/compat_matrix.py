"""The whole compatibility matrix for docs/compat.md, breadth first, resumable.

    python benchmarks/compat_matrix.py                # again to continue: docs/compat.jsonl keeps every result
    python benchmarks/compat_matrix.py --vit-families --record new.jsonl   # the 19 ViT families only

Every timm architecture with attention and at most 120 M parameters (decided on the meta device), ordered so
that a stopped run has covered every family: the smallest model of each family first, then the second smallest
of each, and so on. Each result is appended to docs/compat.jsonl as it comes (`didbq compat --record`);
docs/compat.md is written from all of them at the end. Same checks as `didbq compat --all --max-params 120e6`.
"""
from __future__ import annotations

import argparse
import sys
from itertools import zip_longest
from pathlib import Path

import didbq  # noqa: F401  (torchvision guard before timm)
from didbq.compat import (
    DEFAULT_TIMEOUT,
    VIT_FAMILIES,
    architectures_with_attention,
    family_of,
    meta_scan,
    run_compat,
    write_markdown,
)

ROOT = Path(__file__).resolve().parent.parent


def breadth_first(names: list[str], max_params: float) -> list[str]:
    """Round robin over families, each family's models by parameter count (unknown counts last)."""
    families: dict[str, list[tuple[float, str]]] = {}
    for name in names:
        parameters, _ = meta_scan(name)
        if parameters is None or parameters <= max_params:
            families.setdefault(family_of(name), []).append((parameters or float("inf"), name))
    queues = [[name for _, name in sorted(models)] for _, models in sorted(families.items())]
    return [name for row in zip_longest(*queues) for name in row if name is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-params", type=float, default=120e6)
    parser.add_argument("--record", type=Path, default=ROOT / "docs" / "compat.jsonl")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "compat.md")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--vit-families", action="store_true", help="only the ViT families (didbq.compat.VIT_FAMILIES)")
    args = parser.parse_args()
    names = breadth_first(architectures_with_attention(), args.max_params)
    if args.vit_families:
        names = [name for name in names if family_of(name) in VIT_FAMILIES]
    print(f"{len(names)} architectures with attention at most {args.max_params:.0f} parameters", flush=True)

    def log(name: str, result: object) -> None:
        if result is not None:
            print(f"{name}: {'ok' if result.ok else result.stage + ': ' + str(result.reason)}", flush=True)

    report = run_compat(names, "didb", max_params=args.max_params, timeout=args.timeout,
                        per_process=args.per_process, progress=log, record=args.record)
    write_markdown(report, args.markdown)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
