"""Training curves from metrics.jsonl as a PNG: loss per phase against steps, and each phase's accuracy."""
from __future__ import annotations

import json
from pathlib import Path

from didbq.train.checkpoint import atomic_path


def plot_curves(metrics: Path, destination: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps: dict[str, list[tuple[int, float]]] = {}
    accuracy: dict[str, float] = {}
    for record in records:
        if record.get("event") == "eval":
            accuracy[record["phase"]] = record["top1"]
        elif "loss" in record:
            steps.setdefault(record["phase"], []).append((record["step"], record["loss"]))
    figure, (losses, bars) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for phase, points in steps.items():
        losses.plot([offset + s for s, _ in points], [v for _, v in points], label=phase)
        offset += points[-1][0]
    losses.set(xlabel="step (phases in sequence)", ylabel="loss", title="training loss")
    losses.legend()
    bars.bar(list(accuracy), list(accuracy.values()), color="tab:blue")
    bars.set(ylabel="top-1 (%)", title="test accuracy after each phase", ylim=(0, 100))
    for index, value in enumerate(accuracy.values()):
        bars.text(index, value + 1, f"{value:.1f}", ha="center")
    figure.tight_layout()
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
