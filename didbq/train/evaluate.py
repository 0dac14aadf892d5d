"""Top-1 / top-5 accuracy of a model on a dataset split, and what its binary attention keeps of each row."""
from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from didbq.nn.attention import BinaryAttention


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu",
             workers: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        logits = model(images.to(device))
        logits = logits if isinstance(logits, torch.Tensor) else logits[0]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=-1).sum().item()
        total += labels.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "images": total}


class KeptKeys:
    """While entered, measures every binary attention core (on the float path: the packed kernels do not expose
    A_b): how many keys each query row keeps in the binary attention matrix A_b, how much of the row's softmax
    mass those keys carry, and how often the sign of the core's output is the sign of the query token's own binary
    value. A method that rounds small probabilities to zero keeps few keys on a long row (BiT's {0, a} at 197
    tokens); one whose shortcut outweighs the aggregate (DIBA's (s - a k_i) v_i with binary V) passes each token
    through: near 100% own sign, where tokens that mix with unrelated ones give about 50%. Per layer:

        with KeptKeys(model) as kept:
            evaluate(model, dataset)
        kept.summary()
    """

    # running sums per core: rows, kept keys, rows that keep one key, softmax mass kept, keys per row; output
    # entries compared with the own value, and those of the same sign
    _FIELDS = ("rows", "kept", "single", "mass", "keys", "entries", "own_sign")

    def __init__(self, model: nn.Module) -> None:
        self.cores = {name: module for name, module in model.named_modules()
                      if isinstance(module, BinaryAttention) and module.prob_binarizer.output_is_binary}
        self.sums = {name: dict.fromkeys(self._FIELDS, 0.0) for name in self.cores}
        self._values: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "KeptKeys":
        for name, core in self.cores.items():
            self._handles += [core.prob_binarizer.register_forward_hook(self._counter(name)),
                              core.v_binarizer.register_forward_hook(self._value_keeper(name)),
                              core.register_forward_hook(self._own_sign_counter(name))]
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._values = {}

    def _counter(self, name: str) -> Any:
        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], binary: torch.Tensor) -> None:
            if not module.enabled:  # a full-precision stage: A is not binary
                return
            probs, on = inputs[0].detach(), binary.detach() != 0
            kept = on.sum(-1)
            sums = self.sums[name]
            sums["rows"] += kept.numel()
            sums["kept"] += kept.sum().item()
            sums["single"] += (kept == 1).sum().item()
            sums["mass"] += (probs * on).sum().item()
            sums["keys"] += probs.shape[-1] * kept.numel()
        return count

    def _value_keeper(self, name: str) -> Any:
        def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], values: torch.Tensor) -> None:
            self._values[name] = values.detach()
        return keep

    def _own_sign_counter(self, name: str) -> Any:
        """Compares the core's output with the binary V of the same call, token by token (self-attention only:
        where the output and V differ in shape, query i has no own value)."""
        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            values = self._values.pop(name, None)
            if values is None or values.shape != out.shape or not module.prob_binarizer.enabled:
                return
            sums = self.sums[name]
            sums["entries"] += out.numel()
            sums["own_sign"] += (torch.sign(out.detach()) == torch.sign(values)).sum().item()
        return count

    def summary(self) -> list[dict[str, Any]]:
        """Per core that ran: keys per row, the mean kept, the kept share, the share of rows keeping a single key,
        the mean softmax mass kept (of 1 per row) and the share of output entries with the own value's sign (None
        where the core has no own value), in percent where a share."""
        rows = []
        for name, sums in self.sums.items():
            if sums["rows"]:
                count = sums["rows"]
                own_sign = 100.0 * sums["own_sign"] / sums["entries"] if sums["entries"] else None
                rows.append({"layer": name, "keys": sums["keys"] / count, "kept": sums["kept"] / count,
                             "kept_pct": 100.0 * sums["kept"] / sums["keys"],
                             "single_key_rows_pct": 100.0 * sums["single"] / count,
                             "mass_kept_pct": 100.0 * sums["mass"] / count, "own_sign_pct": own_sign})
        return rows
