"""The engine: one backbone per base model, its adapter bank, and the forward pass over rows of many
adapters (mixed batches, fan-out). A batch's slots in the pools are leased in `slot_lease.py`; the fan-out's
rows and waiting calls are in `fanout.py`."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter import parse_config
from ..backbone import canonical_model_name
from ..errors import AdapterError
from ..layers import LayerYield, MixedBatchUnsupported, Route, route
from ..outputs import postprocess
from ..slots import SlotPools, kernel
from ..textcut import cut_input
from ..train import collate
from .bank import AdapterBank
from .base import Backbone
from .fanout import FanOut, branch, per_input, select_output
from .packed import LoadedAdapter
from .slot_lease import device_index, lease_slots, route_rows, to_device

Input = str | tuple[str, str] | dict
FAN_OUT_ROWS = 256  # (input, task) rows at most in one pass that joins concurrent fan-outs (one call: any)


@dataclass
class Row:
    adapter: LoadedAdapter
    features: dict[str, list[int]]


@dataclass(eq=False)
class Suspended:
    """A forward pass that stepped aside before encoder layer `layer` (see `pass_control`): `hidden` is that
    layer's input, its rows in the pass's own order; `pos[i]` is the row of `hidden` that holds the caller's row
    i. Passed back to `pass_control(resume=...)` with the same rows, the pass goes on from there: exactly what
    it would have computed uninterrupted."""

    layer: int
    hidden: torch.Tensor
    pos: list[int]
    seconds: float = 0.0  # spent on the pass before it stepped aside (the caller's bookkeeping)


class PassSuspended(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """`Engine.forward` stepped aside: nothing was computed for the caller yet; `state` resumes it."""

    def __init__(self, state: Suspended):
        super().__init__(f"the pass stepped aside before layer {state.layer}")
        self.state = state


_PASS: contextvars.ContextVar[tuple[threading.Event | None, Suspended | None]] = contextvars.ContextVar(
    "spafit_pass", default=(None, None))


@contextlib.contextmanager
def pass_control(yield_to: threading.Event | None = None, resume: Suspended | None = None) -> Iterator[None]:
    """For the `Engine.forward` calls made inside: with `yield_to`, a pass steps aside at the next layer boundary
    once the event is set (raising `PassSuspended`, its locks and slot leases released), so that a more urgent
    pass can run first; with `resume`, the pass of those rows goes on where it stepped aside. What a pass steps
    aside from is at most one layer of work, and a resumed one recomputes none of what was done."""
    token = _PASS.set((yield_to, resume))
    try:
        yield
    finally:
        _PASS.reset(token)


class _Loading:
    """A backbone load in progress: other threads that need the same base model wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None


class Engine:
    """Serves predictions for many adapters on one backbone per base model."""

    def __init__(self, *, device: str = "auto", dtype: torch.dtype | None = None,
                 device_bytes: int = 256 << 20, cpu_bytes: int = 1 << 30,
                 loader: Callable[[str], tuple[dict, bytes]] | None = None,
                 base_model_of: Callable[[str], str] | None = None, default_base_model: str | None = None,
                 max_backbones: int = 4, slot_kernel: str = "torch"):
        from ..train import pick_device

        self.device = pick_device(device)
        self.dtype = dtype
        self._device_bytes, self._cpu_bytes = device_bytes, cpu_bytes
        self._loader = loader
        self._base_model_of = base_model_of
        self.default_base_model = default_base_model
        self.slot_kernel = slot_kernel
        kernel(slot_kernel)  # an unknown name fails here, not on the first load
        self.max_backbones = max(1, max_backbones)
        self._backbones: OrderedDict[str, Backbone] = OrderedDict()  # LRU: least recently used first
        self._banks: dict[str, AdapterBank] = {}
        self._loading: dict[str, _Loading] = {}
        self._in_use: dict[str, int] = {}  # base model -> forward passes running on it (never evicted)
        self._retired = {"hits": 0, "misses": 0, "evictions": 0, "loads": 0}  # counters of evicted banks
        # Guards the maps above, never held while a backbone loads: a download never stalls other models.
        self._lock = threading.RLock()
        # One forward at a time: head stubs hold per-call state. Re-entrant for the per-group fallback.
        self._forward_lock = threading.RLock()
        # Fan-outs waiting for the forward lock, per backbone: whoever takes the lock runs them all in one pass.
        self._fan_lock = threading.Lock()
        self._fan_pending: dict[str, list[FanOut]] = {}
        self.backbone_loads = 0
        self.backbone_evictions = 0

    # -- backbones and banks
    def backbone(self, base_model: str | None = None) -> Backbone:
        """The backbone of `base_model` (default: the engine's), loaded on first use. The load runs outside
        the engine's lock (predicts on other backbones go on meanwhile); concurrent callers for the same
        model wait for one load. Past `max_backbones`, the least recently used one not running a forward
        pass is dropped with its adapters (it loads again when next needed)."""
        name = canonical_model_name(base_model or self.default_base_model)
        with self._lock:
            bb = self._backbones.get(name)
            if bb is not None:
                self._backbones.move_to_end(name)
                return bb
            loading = self._loading.get(name)
            owner = loading is None
            if owner:
                loading = self._loading[name] = _Loading()
        if not owner:
            loading.done.wait()
            if loading.error is not None:
                raise loading.error
            return self.backbone(name)
        try:
            bb = Backbone(name, device=self.device, dtype=self.dtype)  # slow: outside the lock
            bank = AdapterBank(bb, device_bytes=self._device_bytes, cpu_bytes=self._cpu_bytes, loader=self._loader,
                                slot_kernel=self.slot_kernel)
            with self._lock:
                self._backbones[name] = bb
                self._banks[name] = bank
                self.backbone_loads += 1
                self._trim(keep=name)
            return bb
        except BaseException as e:
            loading.error = e
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
            loading.done.set()

    @property
    def backbones(self) -> list[str]:
        """Resident backbones, least recently used first."""
        with self._lock:
            return list(self._backbones)

    def _trim(self, keep: str | None = None) -> None:
        """Drop least recently used backbones beyond `max_backbones`, never one in use (or `keep`). Call under
        the lock."""
        while len(self._backbones) > self.max_backbones:
            victim = next((n for n in self._backbones if n != keep and not self._in_use.get(n)), None)
            if victim is None:  # every other one is running a batch: over the bound until they finish
                return
            del self._backbones[victim]
            bank = self._banks.pop(victim)
            for k, v in bank.stats.items():
                self._retired[k] += v
            self.backbone_evictions += 1

    @contextlib.contextmanager
    def _using(self, base_model: str) -> Iterator[Backbone]:
        """The backbone, marked in use (not evictable) for the block."""
        while True:
            bb = self.backbone(base_model)
            with self._lock:
                if self._backbones.get(bb.name) is bb:  # not evicted between the two steps
                    self._in_use[bb.name] = self._in_use.get(bb.name, 0) + 1
                    break
        try:
            yield bb
        finally:
            with self._lock:
                self._in_use[bb.name] -= 1
                if not self._in_use[bb.name]:
                    del self._in_use[bb.name]
                    self._trim()

    def bank(self, base_model: str | None = None) -> AdapterBank:
        while True:  # as `_using`: a backbone evicted between the two steps is loaded again
            bb = self.backbone(base_model)
            with self._lock:
                bank = self._banks.get(bb.name)
                if bank is not None and self._backbones.get(bb.name) is bb:
                    return bank

    def load(self, name: str, cfg: dict, weights: bytes) -> LoadedAdapter:
        base = parse_config(cfg)["base_model"]["name"]
        return self.bank(base).load(name, cfg, weights)

    def evict(self, name: str) -> bool:
        with self._lock:
            banks = list(self._banks.values())
        return any([b.evict(name) for b in banks])

    def adapter(self, name: str) -> LoadedAdapter:
        """A loaded adapter by name; on a miss the `base_model_of(name)` callback says which backbone."""
        with self._lock:
            banks = list(self._banks.values())
        for b in banks:
            if name in b:
                return b.get(name)
        base = self._base_model_of(name) if self._base_model_of else self.default_base_model
        return self.bank(base).get(name)

    def stats(self) -> dict[str, int]:
        with self._lock:  # the banks read outside the engine's lock: a bank's lock is never taken inside it
            out, banks = {**self._retired, "adapters": 0, "adapter_bytes": 0}, list(self._banks.values())
        for b in banks:
            for k, v in b.stats.items():
                out[k] += v
            out["adapters"] += len(b.names())
            out["adapter_bytes"] += b.nbytes
        return out

    # -- tokenisation
    def encode(self, adapter: LoadedAdapter, inputs: Sequence[Input]) -> list[dict[str, list[int]]]:
        """Token ids per input, truncated to what both the adapter and the backbone allow: an adapter that
        claims a longer `max_seq_length` than the backbone has positions still gets rows that fit. Inputs are
        cut first (`textcut.cut_input`, same tokens; a pair of two long sides never reaches the tokenizer whole),
        so every path (lone, batched, fan-out, batch jobs) tokenises the same cut inputs."""
        bb = self._backbone_of(adapter)
        limit = adapter.max_seq_length if bb.max_length is None else min(adapter.max_seq_length, bb.max_length)
        texts, pairs = split_inputs([cut_input(x, limit) for x in inputs])  # what the limit needs (textcut)
        with bb.tokenizer_lock:  # the limit is the tokenizer's state, shared: one call at a time (`Backbone`)
            enc = bb.tokenizer(texts, pairs, truncation=True, max_length=limit) if pairs else \
                bb.tokenizer(texts, truncation=True, max_length=limit)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _encode_mixed(self, adapter: LoadedAdapter, inputs: Sequence[Input]) -> list[dict[str, list[int]]]:
        """As `encode`, for inputs that may mix single texts and text pairs (each kind in one call)."""
        pair = [not isinstance(x, str) and (not isinstance(x, dict) or x.get("text_pair") is not None)
                for x in inputs]
        if all(pair) or not any(pair):
            return self.encode(adapter, inputs)
        out: list[dict[str, list[int]] | None] = [None] * len(inputs)
        for kind in (False, True):
            idx = [i for i, p in enumerate(pair) if p is kind]
            for i, f in zip(idx, self.encode(adapter, [inputs[i] for i in idx]), strict=True):
                out[i] = f
        return out  # type: ignore[return-value]

    def _backbone_of(self, adapter: LoadedAdapter) -> Backbone:
        return self.backbone(_base_of(adapter))

    # -- forward
    @torch.inference_mode()
    def forward(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Logits per row, rows of any adapters (on one backbone) in one forward pass."""
        if not rows:
            return []
        base = _base_of(rows[0].adapter)
        if any(_base_of(r.adapter) != base for r in rows):
            raise AdapterError("one batch may only mix adapters of the same base model")
        with self._using(base) as bb:
            return self._forward(bb, rows)

    def _forward(self, bb: Backbone, rows: Sequence[Row]) -> list[torch.Tensor]:
        pools = self._banks[bb.name].pools
        yield_to, resume = _PASS.get()
        with self._forward_lock, pools.lock, lease_slots(pools, [r.adapter for r in rows]) as slots:
            order = pools.row_order(slots) if len(set(slots)) > 1 else None  # rows of one LoRA rank together
            if order is not None:
                rows, slots = [rows[i] for i in order], [slots[i] for i in order]
            batch = to_device(collate([r.features for r in rows], bb.pad_id), bb.device)
            deltas = route_rows(pools, slots)
            r = Route(deltas=deltas, yield_to=yield_to)
            if resume is not None:  # the slots may have moved since: the saved rows follow this pass's order
                src = [resume.pos[i] for i in (order if order is not None else range(len(rows)))]
                r.skip_below = resume.layer
                r.inject = resume.hidden if src == list(range(len(src))) else resume.hidden[src]
            try:
                outputs = self._run(bb, batch, r)
            except LayerYield as y:
                pos = [0] * len(rows)
                for k, i in enumerate(order if order is not None else range(len(rows))):
                    pos[i] = k
                raise PassSuspended(Suspended(y.layer, y.hidden, pos)) from None
            except MixedBatchUnsupported:  # e.g. DeBERTa's shared relative-position projections
                with pass_control():  # one pass per adapter, from the start, never stepping aside
                    out = self._forward_by_group(bb, rows)
            else:
                out = self._heads(bb, pools, outputs, [r.adapter for r in rows], deltas.cols)
        if order is None:
            return out
        back: list[torch.Tensor | None] = [None] * len(out)
        for i, logits in zip(order, out, strict=True):
            back[i] = logits
        return back  # type: ignore[return-value]

    def _forward_by_group(self, bb: Backbone, rows: Sequence[Row]) -> list[torch.Tensor]:
        """One pass per adapter, on `bb`, which the caller holds in use (`_using`). Never through `forward`: that
        takes the engine's lock, and a caller here may hold the pools' lock, which a load takes after the bank's
        while `stats()` takes the bank's after the engine's (a deadlock of the three, found by a stress test)."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(r.adapter), []).append(i)
        for idx in groups.values():
            for i, logits in zip(idx, self._forward(bb, [rows[i] for i in idx]), strict=True):
                out[i] = logits
        return out  # type: ignore[return-value]

    def _run(self, bb: Backbone, batch: dict, r: Route):
        with route(r):
            return bb.base(**bb.model_inputs(batch))

    def _heads(self, bb: Backbone, pools: SlotPools, outputs, adapters: Sequence[LoadedAdapter],
               cols: torch.Tensor) -> list[torch.Tensor]:
        """Every row's head in one call: the head module padded to the most labels resident, with each row's
        head tensors gathered from the pools (one row of them for a single-adapter batch; per row, batched
        with `vmap`, otherwise). One copy to the host at the end; padded logits sliced away."""
        head = bb.padded_head(pools.labels)
        stub = getattr(head, head.base_model_prefix)
        params = pools.head_params(cols)
        try:
            if cols.shape[0] == 1:
                stub.outputs = outputs
                logits = torch.func.functional_call(head, {k: v[0] for k, v in params.items()}, (),
                                                    strict=True).logits
            else:
                logits = _vmapped_head(head, stub, params, outputs)
        finally:
            stub.outputs = None
        logits = logits.float().cpu()  # the batch's one synchronisation
        return [logits[i, : a.task.num_labels] for i, a in enumerate(adapters)]

    # -- public prediction API
    def predict(self, name: str, inputs: Sequence[Input], top_k: int | None = None) -> list[dict[str, Any]]:
        adapter = self.adapter(name)
        rows = [Row(adapter, f) for f in self.encode(adapter, inputs)]
        return [postprocess(adapter.task, logits, top_k) for logits in self.forward(rows)]

    def predict_mixed(self, requests: Sequence[tuple[str, Input]], top_k: int | None = None) -> list[dict]:
        rows = []
        for name, inp in requests:
            adapter = self.adapter(name)
            rows.append(Row(adapter, self.encode(adapter, [inp])[0]))
        return [postprocess(r.adapter.task, logits, top_k) for r, logits in zip(rows, self.forward(rows), strict=True)]

    def fan_out(self, names: Sequence[str], inp: Input, top_k: int | None = None) -> dict[str, dict]:
        """One input asked of many tasks: the shared frozen prefix runs once, then one row per task."""
        return self.fan_out_many(names, [inp], top_k)[0]

    @torch.inference_mode()
    def fan_out_many(self, names: Sequence[str], inputs: Sequence[Input],
                     top_k: int | None = None) -> list[dict[str, dict]]:
        """Every input asked of every task in one pass that branches where the tasks' layers diverge: the
        layers below every task's first trained layer run once per input, on a batch of the inputs; at each
        task's first trained layer the input's row branches into one row for that task (`_fan_out_shared`).
        Concurrent calls on one backbone share that pass (`_fan_out_together`). Tasks on other base models
        branch in their own pass. Per input, task name -> prediction."""
        adapters = [self.adapter(n) for n in names]
        out: list[dict[str, dict]] = [{} for _ in inputs]
        if not adapters or not inputs:
            return out
        groups: dict[tuple, list[int]] = {}
        for j, a in enumerate(adapters):
            bb = self._backbone_of(a)
            limit = a.max_seq_length if bb.max_length is None else min(a.max_seq_length, bb.max_length)
            groups.setdefault((_base_of(a), limit), []).append(j)
        for idx in groups.values():
            group = [adapters[j] for j in idx]
            feats = self._encode_mixed(group[0], inputs)  # the same for the whole group
            with self._using(_base_of(group[0])) as bb:
                logits = self._fan_out_together(bb, FanOut(group, feats))
            for i in range(len(inputs)):
                for jj, j in enumerate(idx):
                    out[i][names[j]] = postprocess(adapters[j].task, logits[i][jj], top_k)
        return [{n: d[n] for n in names} for d in out]  # in the order asked

    def _fan_out_together(self, bb: Backbone, job: FanOut) -> list[list[torch.Tensor]]:
        """`job`'s logits (per input, per task), computed in one pass with every other fan-out on this backbone
        that waits for the forward lock meanwhile: the caller that takes the lock runs all those waiting."""
        with self._fan_lock:
            self._fan_pending.setdefault(bb.name, []).append(job)
        while not job.done.is_set():
            with self._forward_lock:
                with self._fan_lock:
                    pending, jobs, rows = self._fan_pending.get(bb.name, []), [], 0
                    while pending and (not jobs or rows + pending[0].rows <= FAN_OUT_ROWS):  # first come first
                        jobs.append(pending.pop(0))
                        rows += jobs[-1].rows
                if jobs:
                    self._fan_out_jobs(bb, jobs)
        if job.error is not None:
            raise job.error
        return job.logits  # type: ignore[return-value]

    def _fan_out_jobs(self, bb: Backbone, jobs: list[FanOut]) -> None:
        """Every job's logits in one pass (each job alone where the pass fails, so an error reaches only its
        own caller; per adapter group where the model cannot mix adapters in one batch)."""
        try:
            adapters = list({id(a): a for job in jobs for a in job.adapters}.values())
            col = {id(a): j for j, a in enumerate(adapters)}
            feats = [f for job in jobs for f in job.feats]
            tasks_of = [[col[id(a)] for a in job.adapters] for job in jobs for _ in job.feats]
            logits = self._fan_out_shared(bb, adapters, feats, tasks_of)
            if logits is None:  # the model cannot mix adapters in one batch
                for job in jobs:
                    flat = self._forward_by_group(bb, [Row(a, f) for f in job.feats for a in job.adapters])
                    k = len(job.adapters)
                    job.finish([flat[i * k: (i + 1) * k] for i in range(len(job.feats))])
                return
            at = 0
            for job in jobs:
                job.finish(logits[at: at + len(job.feats)])
                at += len(job.feats)
        except BaseException as e:
            if len(jobs) == 1:
                jobs[0].finish(error=e)
                return
            for job in jobs:
                self._fan_out_jobs(bb, [job])

    def _fan_out_shared(self, bb: Backbone, adapters: Sequence[LoadedAdapter], feats: Sequence[dict[str, list[int]]],
                        tasks_of: Sequence[Sequence[int]]) -> list[list[torch.Tensor]] | None:
        """Logits of input i under adapters[j] for each j in tasks_of[i] (per input, in that order). The pass
        runs in stages between the tasks' distinct first trained layers n1 (at most the depth L): a row per
        (input, None), the trunk, carries the input through the frozen layers while some of its tasks have not
        branched yet (no deltas: its slot is none); at layer n1 the input's trunk row branches into one row
        per task of that n1 (its hidden state copied), which then runs with its task's deltas. Layers below
        an input's smallest n1 run on one row per input instead of one per (input, task). None where the model
        cannot mix adapters in one batch."""
        depth, n = bb.stack.num_layers, len(feats)
        start = [min(a.first_trained_layer, depth) for a in adapters]
        inputs = to_device(collate(list(feats), bb.pad_id), bb.device)  # (N, T)
        pools = self._banks[bb.name].pools
        with self._forward_lock, pools.lock, lease_slots(pools, adapters) as task_slot:
            rows: list[tuple[int, int | None]] = [(i, None) for i in range(n)]  # (input, task or None: trunk)
            hidden, done = None, 0  # layers [0, done) have run; `hidden`: the input of layer `done`
            pick: list[int] | None = None  # the row of `hidden` each of `rows` starts from (None: row k from k)
            try:
                for b in sorted(set(start)):
                    if b < depth:
                        if b > done:
                            hidden, done = self._stage(bb, pools, inputs, rows, task_slot, done, b, hidden, pick), b
                            pick = None
                            if hidden is None:  # no layer at index b ran: run each row in full
                                flat = self._forward(bb, [Row(adapters[j], feats[i]) for i in range(n)
                                                          for j in tasks_of[i]])
                                return per_input(flat, tasks_of)
                        rows, took = branch(rows, b, start, tasks_of)
                        pick = took if pick is None else [pick[k] for k in took]
                        order = pools.row_order([None if j is None else task_slot[j] for _, j in rows])
                        if order is not None:  # rows of one LoRA rank together (see `Engine._forward`)
                            rows, pick = [rows[k] for k in order], [pick[k] for k in order]
                outputs = self._stage(bb, pools, inputs, rows, task_slot, done, depth, hidden, pick)
            except MixedBatchUnsupported:
                return None
            at = {row: i for i, row in enumerate(rows)}
            pick = [at.get((i, j), at.get((i, None))) for i in range(n) for j in tasks_of[i]]
            outputs = select_output(outputs, pick)
            flat_adapters = [adapters[j] for i in range(n) for j in tasks_of[i]]
            slots = [task_slot[j] for i in range(n) for j in tasks_of[i]]
            flat = self._heads(bb, pools, outputs, flat_adapters, route_rows(pools, slots).cols)
            return per_input(flat, tasks_of)

    def _stage(self, bb: Backbone, pools: SlotPools, inputs: dict, rows: Sequence[tuple[int, int | None]],
               task_slot: Sequence[int], lo: int, hi: int, hidden: torch.Tensor | None,
               pick: list[int] | None = None):
        """Layers [lo, hi) on `rows` (input, task or None), fed `hidden` (the input of layer lo; None: from
        the embeddings), row k from row pick[k] of it: the input of layer `hi` (None where no layer `hi` ran),
        or the model's outputs where `hi` is the depth. Where rows start from the same state (the branches of
        one trunk row), the linears that read layer lo's input (attention's query, key and value) run once
        per distinct state (`Route.inject_rows`)."""
        which = [i for i, _ in rows]
        if which != list(range(len(inputs["input_ids"]))):
            idx = device_index(which, inputs["input_ids"].device)
            inputs = {k: v.index_select(0, idx) for k, v in inputs.items()}
        slots = [None if j is None else task_slot[j] for _, j in rows]
        deltas = route_rows(pools, slots) if any(s is not None for s in slots) else {}
        last = hi >= bb.stack.num_layers
        distinct, at = None, None
        if hidden is not None and pick is not None and pick != list(range(hidden.shape[0])):
            at = device_index(pick, hidden.device)
            distinct, hidden = hidden, hidden.index_select(0, at)
            if distinct.shape[0] >= len(pick):  # no row shared: nothing to save
                distinct, at = None, None
        r = Route(deltas=deltas, skip_below=lo, inject=hidden, stop_at=None if last else hi,
                  inject_rows=distinct, inject_index=at)
        outputs = self._run(bb, inputs, r)
        return outputs if last else r.captured


def _vmapped_head(head: nn.Module, stub, params: dict[str, torch.Tensor], outputs) -> torch.Tensor:
    """The head on each row with that row's own head tensors: `vmap` over rows of a batch-of-one call."""
    keys = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    cls = type(outputs)

    def one(p, *tensors):
        stub.outputs = cls(**{k: t.unsqueeze(0) for k, t in zip(keys, tensors, strict=True)})
        return torch.func.functional_call(head, p, (), strict=True).logits[0]

    return torch.func.vmap(one)(params, *[outputs[k] for k in keys])


def _base_of(adapter: LoadedAdapter) -> str:
    return canonical_model_name(adapter.config["base_model"]["name"])


def split_inputs(inputs: Sequence[Input]) -> tuple[list[str], list[str] | None]:
    texts, pairs = [], []
    for x in inputs:
        if isinstance(x, str):
            texts.append(x)
            pairs.append(None)
        elif isinstance(x, dict):
            texts.append(x["text"])
            pairs.append(x.get("text_pair"))
        else:
            texts.append(x[0])
            pairs.append(x[1])
    if all(p is None for p in pairs):
        return texts, None
    if any(p is None for p in pairs):
        raise AdapterError("mix of single texts and text pairs in one call; send them separately",
                           field="inputs")
    return texts, pairs
