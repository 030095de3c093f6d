"""Fan-out bookkeeping: rows of (input, task) that branch off one trunk row per input at each task's first
trained layer, and the calls waiting to share a pass (`forward.Engine._fan_out_shared`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from .packed import LoadedAdapter


def branch(rows: list[tuple[int, int | None]], b: int, start: Sequence[int],
           tasks_of: Sequence[Sequence[int]]) -> tuple[list[tuple[int, int | None]], list[int]]:
    """At layer `b`, each trunk row (i, None) branches into (i, j) for each of input i's tasks j that start at
    `b`; it stays while input i has tasks that start later. Trunk rows first, then the new branches, then the
    rows already branched. Returns the new rows and, for each, the old row whose hidden state it takes (a new
    branch: its trunk row's; none is copied here, see `Engine._stage`)."""
    trunk = [k for k, (_, j) in enumerate(rows) if j is None]
    layout = [(rows[k], k) for k in trunk if any(start[j] > b for j in tasks_of[rows[k][0]])]
    layout += [((rows[k][0], j), k) for k in trunk for j in tasks_of[rows[k][0]] if start[j] == b]
    layout += [(row, k) for k, row in enumerate(rows) if row[1] is not None]  # (row, whose hidden state it takes)
    return [row for row, _ in layout], [k for _, k in layout]


def per_input(flat: list[torch.Tensor], tasks_of: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
    out, at = [], 0
    for tasks in tasks_of:
        out.append(flat[at: at + len(tasks)])
        at += len(tasks)
    return out


class FanOut:
    """One fan-out call waiting for (or running) its pass: its tasks, its inputs' features, and its result."""

    def __init__(self, adapters: Sequence[LoadedAdapter], feats: Sequence[dict[str, list[int]]]):
        self.adapters, self.feats = list(adapters), list(feats)
        self.rows = len(self.adapters) * len(self.feats)
        self.done = threading.Event()
        self.logits: list[list[torch.Tensor]] | None = None
        self.error: BaseException | None = None

    def finish(self, logits: list[list[torch.Tensor]] | None = None, error: BaseException | None = None) -> None:
        self.logits, self.error = logits, error
        self.done.set()


def select_output(outputs, idx: list[int]):
    """A model output over rows `idx` of it (every tensor field indexed on its first dimension)."""
    if idx == list(range(outputs.last_hidden_state.shape[0])):
        return outputs
    t = index(idx, outputs.last_hidden_state.device)
    return type(outputs)(**{k: v.index_select(0, t) for k, v in outputs.items() if isinstance(v, torch.Tensor)})


def index(idx: list[int], device: torch.device) -> torch.Tensor:
    """A host list of indices on `device` (through pinned memory, without waiting, on a GPU)."""
    t = torch.tensor(idx)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)
