"""A batch's rows and their adapters' slots in a bank's pools: the slot each adapter holds (or borrows for the
forward, `lease_slots`), the pools' route for the rows (`route_rows`), and host tensors onto the device
without waiting (`to_device`, `device_index`). Called by `forward.Engine` under the pools' lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..slots import SlotPools
from .packed import LoadedAdapter


def route_rows(pools: SlotPools, slots: list[int | None]):
    """The pools' route for rows in `slots` (None: a row with no adapter); one entry where every row has the
    same adapter."""
    distinct = sorted({s for s in slots if s is not None})
    if len(set(slots)) == 1 and slots[0] is not None:
        return pools.route(device_index(slots[:1], pools.device), distinct)
    return pools.route(device_index([0 if s is None else s for s in slots], pools.device), distinct, slots)


def device_index(slots: list[int], device: torch.device) -> torch.Tensor:
    return to_device({"s": torch.tensor(slots)}, device)["s"]


@contextlib.contextmanager
def lease_slots(pools: SlotPools, adapters: Sequence[LoadedAdapter]) -> Iterator[list[int]]:
    """The slot of each of `adapters` in `pools`, on the host. An adapter not in these pools (evicted or
    replaced while its request waited, or of a backbone since reloaded) borrows a slot for the block. Call
    under the pools' lock: no slot changes meanwhile."""
    borrowed: dict[int, int] = {}
    slots = []
    try:
        for a in adapters:
            s = a.slot if a.pools is pools else None
            if s is None:
                s = borrowed.get(id(a))
                if s is None:
                    s = borrowed[id(a)] = pools.attach(a.layout, a.packed(), a.task.num_labels)
            slots.append(s)
        yield slots
    finally:
        for s in borrowed.values():
            pools.detach(s, shrink=False)  # not a re-pad of every head per forward: the bank's next detach shrinks


@contextlib.contextmanager
def batch_slots(pools: SlotPools, adapters: Sequence[LoadedAdapter]) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """The row-to-slot index of a batch whose row i belongs to adapters[i] (one entry where every row has
    the same adapter), on the pools' device, and its distinct slots (see `lease_slots`)."""
    first = adapters[0]
    if all(a is first for a in adapters):
        adapters = adapters[:1]
    with lease_slots(pools, adapters) as slots:
        yield device_index(slots, pools.device), list(set(slots))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors onto `device`: as they are on the CPU; through pinned memory, without waiting, on a GPU."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
