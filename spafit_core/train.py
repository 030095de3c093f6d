"""The training loop: linear warmup + decay, gradient accumulation and clipping, evaluation each epoch with
the task's metric, best-epoch selection, early stopping, seeds, AMP on CUDA, a progress callback, a
cooperative stop flag, and resumable checkpoints.

The optimizer and its per-part learning rates are in `optim.py`; the checkpoint format, its save, resume and
refusal on mismatch are in `checkpoint.py` (their names are re-exported here). A run killed at any point
resumes from the last complete checkpoint; the data order of each epoch is a function of (seed, epoch), so
skipping the batches already done reproduces the same run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (  # noqa: F401  (re-exported: the checkpoint API was train.py's)
    CHECKPOINT_FORMAT,
    check_resumable,
    load_checkpoint,
    read_checkpoint_meta,
    run_identity,
    save_checkpoint,
)
from .config import TrainConfig
from .errors import ConfigError, NonFiniteError, TrainingCancelled
from .model import SpafitModel
from .optim import build_optimizer, param_groups  # noqa: F401  (param_groups re-exported)

Event = dict[str, Any]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- tokenised data
@dataclass
class Encoded:
    """Tokenised examples, unpadded. `features[i]` holds input_ids (and token_type_ids where the model
    uses them); `labels` is a tensor (long ids, float values or float multi-hot rows)."""

    features: list[dict[str, list[int]]]
    labels: torch.Tensor | None
    truncated: int  # rows longer than max_length, truncated (reported, never silent)

    def __len__(self) -> int:
        return len(self.features)


def encode(examples, tokenizer, max_length: int, task_type: str) -> Encoded:
    texts, pairs = list(examples.texts), examples.text_pairs
    args = (texts, list(pairs)) if pairs is not None else (texts,)
    full = tokenizer(*args, truncation=False, add_special_tokens=True)["input_ids"]
    truncated = sum(1 for ids in full if len(ids) > max_length)
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
    labels = None
    if examples.labels is not None and len(examples.labels):
        dtype = torch.long if task_type == "single_label_classification" else torch.float32
        labels = torch.tensor(examples.labels, dtype=dtype)
    return Encoded(features, labels, truncated)


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row: input_ids (B, T), attention_mask (B, T), token_type_ids (B, T)."""
    T = max(len(f["input_ids"]) for f in features)
    out: dict[str, torch.Tensor] = {}
    for key in features[0]:
        pad = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([f[key] + [pad] * (T - len(f[key])) for f in features], dtype=torch.long)
    out["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (T - len(f["input_ids"]))
                                          for f in features], dtype=torch.long)
    return out


def loss_fn(task_type: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if task_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    if task_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def predictions(task_type: str, logits: torch.Tensor) -> np.ndarray:
    if task_type == "regression":
        return logits.float().squeeze(-1).cpu().numpy()
    if task_type == "multi_label_classification":
        return (logits.float() > 0).int().cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


# ----------------------------------------------------------------------------- frozen-prefix cache
class PrefixCache:
    """Hidden states entering the first trained layer, per example, unpadded, in `dtype`, computed once with
    the prefix in eval mode. Bounded: up to `max_bytes` on the training device; on CUDA the next
    `host_max_bytes` in pinned host memory; rows beyond both are recomputed when their batch comes.
    `nbytes` is what it holds (device + host)."""

    def __init__(self, model: SpafitModel, data: Encoded, batch_size: int, device: torch.device,
                 dtype: torch.dtype, pad_id: int, *, max_bytes: int = 2 << 30, host_max_bytes: int = 8 << 30):
        self.model, self.data, self.device, self.dtype, self.pad_id = model, data, device, dtype, pad_id
        self.states: list[torch.Tensor | None] = []
        self.device_bytes = self.host_bytes = 0
        host_max_bytes = host_max_bytes if device.type == "cuda" else 0  # on CPU the device is the host
        row_bytes = 0  # the smallest row seen: once neither tier can take one, stop computing
        was_training = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            for start in range(0, len(data), batch_size):
                feats = data.features[start:start + batch_size]
                if row_bytes and self.device_bytes + row_bytes > max_bytes and \
                        self.host_bytes + row_bytes > host_max_bytes:
                    self.states.extend([None] * len(feats))
                    continue
                batch = {k: v.to(device) for k, v in collate(feats, pad_id).items()}
                hidden = model.prefix_hidden(batch)  # (B, T, H)
                for i, f in enumerate(feats):
                    t = hidden[i, : len(f["input_ids"])].to(dtype)
                    n = t.numel() * t.element_size()
                    row_bytes = min(row_bytes or n, n)
                    if self.device_bytes + n <= max_bytes:
                        self.states.append(t.clone())
                        self.device_bytes += n
                    elif self.host_bytes + n <= host_max_bytes:
                        self.states.append(t.to("cpu").pin_memory())
                        self.host_bytes += n
                    else:
                        self.states.append(None)
        finally:
            for m, mode in was_training:
                m.training = mode
        self.nbytes = self.device_bytes + self.host_bytes
        self.recomputed_rows = sum(1 for t in self.states if t is None)

    def batch(self, indices: list[int], dtype: torch.dtype) -> torch.Tensor:
        rows = [self.states[i] for i in indices]
        missing = [j for j, r in enumerate(rows) if r is None]
        if missing:  # beyond the bound: run the prefix for these rows now (eval mode, no grad)
            feats = [self.data.features[indices[j]] for j in missing]
            batch = {k: v.to(self.device) for k, v in collate(feats, self.pad_id).items()}
            hidden = self.model.prefix_hidden(batch)
            for k, j in enumerate(missing):
                rows[j] = hidden[k, : len(feats[k]["input_ids"])].to(self.dtype)
        T = max(r.shape[0] for r in rows)
        out = torch.zeros((len(rows), T, rows[0].shape[-1]), dtype=dtype, device=self.device)  # pads are masked
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r.to(self.device, non_blocking=True)
        return out


def cache_dtype(name: str, device: torch.device) -> torch.dtype:
    """The prefix cache's dtype: `auto` is bfloat16 on CUDA (half the memory), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# ----------------------------------------------------------------------------- validation split
MIN_CARVED_ROWS = 8  # a carved validation split (and what is left to train on) has at least this many rows


def carve_validation(data: Encoded, fraction: float, seed: int, task_type: str) -> tuple[Encoded, Encoded] | None:
    """(train, validation) with `fraction` of the rows held out: per class for single-label classification
    (round(fraction x class size) of each class), at random otherwise; a function of `seed` only. None when
    either part would have fewer than MIN_CARVED_ROWS rows or there are no labels."""
    if fraction <= 0 or data.labels is None:
        return None
    g = torch.Generator().manual_seed(seed + 7919)  # not the data order's stream
    n = len(data)
    if task_type == "single_label_classification":
        held: list[int] = []
        for c in sorted(set(data.labels.tolist())):
            idx = (data.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            held += idx[: int(round(fraction * len(idx)))].tolist()
    else:
        held = torch.randperm(n, generator=g)[: int(round(fraction * n))].tolist()
    if len(held) < MIN_CARVED_ROWS or n - len(held) < MIN_CARVED_ROWS:
        return None
    held_set = set(held)
    keep = [i for i in range(n) if i not in held_set]
    held = sorted(held)

    train_part = Encoded([data.features[i] for i in keep], data.labels[keep], data.truncated)  # as reported before
    return train_part, Encoded([data.features[i] for i in held], data.labels[held], 0)


# ----------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    metrics: dict[str, float]  # the best epoch's validation metrics (empty without validation data)
    best_epoch: int | None
    history: list[dict[str, Any]]  # one entry per epoch: loss, metrics, seconds
    steps: int
    train_seconds: float
    truncated_rows: int
    stopped_early: bool
    prefix_cache_bytes: int = 0
    resumed_from_step: int = 0
    main_metric: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Stopped(Exception):
    pass


# ----------------------------------------------------------------------------- the loop
def train(
    model: SpafitModel,
    train_data: Encoded,
    cfg: TrainConfig,
    *,
    validation: Encoded | None = None,
    metrics: list[str] | None = None,
    callback: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | Path | None = None,
) -> TrainResult:
    """Train `model` in place; on return it holds the best epoch's tensors (by the first of `metrics`
    on `validation`, else the last epoch's) and every module is in the mode it had before. Without
    `validation`, `cfg.validation_fraction` of the training rows (per class, seeded) becomes it. With `checkpoint_path`, state is saved there every
    `cfg.checkpoint_every_steps` steps and each epoch's end, and an existing checkpoint is resumed.
    `should_stop()` is polled each step; when true, TrainingCancelled is raised and nothing is saved."""
    from .metrics import HIGHER_IS_BETTER, compute_metrics, default_metrics

    if len(train_data) == 0:
        raise ConfigError("the training set is empty", field="train_dataset")
    emit = callback or (lambda e: None)
    task_type = model.task.task_type
    carved = 0
    if validation is None:  # carve one, so that best-epoch selection and early stopping have something to go by
        split = carve_validation(train_data, cfg.validation_fraction, cfg.seed, task_type)
        if split is not None:
            train_data, validation = split
            carved = len(validation)
            emit({"type": "log", "message": f"validation: {carved} of {carved + len(train_data)} training rows "
                                            f"held out ({cfg.validation_fraction:g}"
                                            f"{', per class' if task_type == 'single_label_classification' else ''}"
                                            f", seed {cfg.seed})"})
        elif cfg.validation_fraction > 0:
            emit({"type": "log", "message": "validation: none given and too few rows to carve one; the last "
                                            "epoch's adapter is kept"})
    metrics = metrics or default_metrics(task_type, model.task.num_labels)
    main = metrics[0]
    higher_better = HIGHER_IS_BETTER.get(main, True)
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    model.to(device)
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0

    use_cache = cfg.prefix_cache and not model.plan.full and model.plan.first_trained_layer > 0 and \
        model.plan.first_trained_layer < model.stack.num_layers
    if cfg.prefix_cache and not use_cache:
        emit({"type": "log", "message": "prefix cache not used: no frozen layers below a trained one"})
    # Every module's mode and the prefix flag as the caller left them: restored when train() returns.
    modes = [(m, m.training) for m in model.modules()]
    prefix_eval_before = model.prefix_eval

    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(math.ceil(len(train_data) / cfg.batch_size) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)

    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_metric": None, "best_epoch": None,
             "bad_epochs": 0, "history": [], "train_seconds": 0.0}
    best_tensors: dict[str, torch.Tensor] | None = None
    resumed_from = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and ckpt.exists() and "run" not in read_checkpoint_meta(ckpt):
        # Written by a version that recorded neither the run's identity nor this optimizer layout: what it was
        # made under cannot be checked, so it is not resumed (the next checkpoint replaces it).
        emit({"type": "log", "message": "checkpoint from an older version: training starts over"})
    elif ckpt is not None and ckpt.exists():
        state, best_tensors = load_checkpoint(ckpt, model, optimizer, scheduler, cfg, scaler=scaler)
        resumed_from = state["step"]
        emit({"type": "resumed", "step": resumed_from, "epoch": state["epoch"]})

    cache = None
    if use_cache:
        t0 = time.perf_counter()
        cache = PrefixCache(model, train_data, cfg.eval_batch_size or 2 * cfg.batch_size, device,
                            cache_dtype(cfg.prefix_cache_dtype, device), pad_id, max_bytes=cfg.prefix_cache_max_bytes,
                            host_max_bytes=cfg.prefix_cache_host_max_bytes)
        emit({"type": "log", "message": f"prefix cache: {len(train_data)} examples, {cache.device_bytes} bytes on "
                                        f"{device.type}, {cache.host_bytes} in host memory, {cache.recomputed_rows} "
                                        f"recomputed each epoch, {time.perf_counter() - t0:.2f}s"})

    def save(at_epoch_end: bool) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, model, optimizer, scheduler, state, best_tensors, cfg, scaler=scaler)
            emit({"type": "checkpoint", "step": state["step"], "epoch": state["epoch"],
                  "path": str(ckpt), "epoch_end": at_epoch_end})

    # A run resumed from the checkpoint its early stop wrote (the process killed while it serialised the adapter)
    # stops there too, rather than training on into another run.
    stopped_early = bool(state.get("stopped_early"))
    start_time = time.perf_counter()
    base_seconds = state["train_seconds"]
    steps_done_this_run = 0
    try:
        model.prefix_eval = use_cache  # set here, so a refusal above (a checkpoint, the cache) leaves it as it was
        while state["epoch"] < cfg.epochs and not stopped_early:
            epoch = state["epoch"]
            model.train()
            order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            batches = [order[i: i + cfg.batch_size].tolist() for i in range(0, len(order), cfg.batch_size)]
            # A resumed run continues the interrupted epoch at the next micro-batch, with the same order, and its
            # loss so far (the epoch's reported loss covers every batch of it, as in an uninterrupted run).
            running, count = (state.get("epoch_loss_sum", 0.0), state.get("epoch_batches", 0)) \
                if state["batch_in_epoch"] else (0.0, 0)
            accum = cfg.gradient_accumulation_steps
            epoch_t0 = time.perf_counter()
            for b_idx in range(state["batch_in_epoch"], len(batches)):
                if should_stop is not None and should_stop():
                    raise _Stopped
                idx = batches[b_idx]
                batch = {k: v.to(device) for k, v in collate([train_data.features[i] for i in idx], pad_id).items()}
                labels = train_data.labels[idx].to(device)
                prefix = cache.batch(idx, model.hf.dtype).to(device) if cache is not None else None
                # Each micro-batch's mean loss weighs its share of the rows of its accumulation group (the last one
                # of an epoch may be short, its batches smaller): the step's gradient is the mean over the group's
                # rows, as one batch of them would give.
                group = batches[b_idx - b_idx % accum: b_idx - b_idx % accum + accum]
                weight = len(idx) / sum(len(g) for g in group)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(batch, prefix_hidden=prefix)
                    mean_loss = loss_fn(task_type, logits, labels)
                    loss = mean_loss * weight if accum > 1 else mean_loss
                loss_value = mean_loss.item()
                if not math.isfinite(loss_value):  # stop here: every later step would only spread the NaN
                    raise NonFiniteError(
                        f"the training loss became {loss_value} at step {state['step'] + 1} of {total_steps} "
                        f"(epoch {epoch + 1}), and the job stops there. Lower learning_rate or weight_decay, or check "
                        "the labels", detail={"step": state["step"] + 1, "epoch": epoch + 1})
                (scaler.scale(loss) if scaler else loss).backward()
                running += loss_value
                count += 1
                last_in_epoch = b_idx == len(batches) - 1
                state["batch_in_epoch"] = b_idx + 1
                if (b_idx + 1) % accum and not last_in_epoch:
                    continue
                if cfg.max_grad_norm is not None:
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                steps_done_this_run += 1
                elapsed = base_seconds + time.perf_counter() - start_time
                if state["step"] % cfg.log_every_steps == 0 or state["step"] == total_steps:
                    per_step = (time.perf_counter() - start_time) / steps_done_this_run
                    emit({"type": "progress", "step": state["step"], "total_steps": total_steps,
                          "epoch": epoch + (b_idx + 1) / len(batches), "loss": running / max(count, 1),
                          "lr": scheduler.get_last_lr()[0], "elapsed_seconds": elapsed,
                          "eta_seconds": per_step * (total_steps - state["step"])})
                if cfg.checkpoint_every_steps and state["step"] % cfg.checkpoint_every_steps == 0 \
                        and not last_in_epoch:
                    state["train_seconds"] = elapsed
                    state["epoch_loss_sum"], state["epoch_batches"] = running, count
                    save(False)

            entry = {"epoch": epoch + 1, "loss": running / max(count, 1), "step": state["step"],
                     "seconds": time.perf_counter() - epoch_t0}
            if validation is not None and len(validation):
                scores = evaluate(model, validation, metrics, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                  device=device, amp_dtype=amp_dtype, pad_id=pad_id, compute=compute_metrics)
                entry["metrics"] = scores
                value = scores[main]
                better = state["best_metric"] is None or (value > state["best_metric"] if higher_better
                                                          else value < state["best_metric"])
                if better:
                    state["best_metric"], state["best_epoch"], state["bad_epochs"] = value, epoch + 1, 0
                    best_tensors = {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                emit({"type": "eval", "epoch": epoch + 1, "step": state["step"], "metrics": scores,
                      "main_metric": main, "is_best": better})
            state["history"].append(entry)
            state["epoch"] = epoch + 1
            state["batch_in_epoch"] = 0
            state["epoch_loss_sum"], state["epoch_batches"] = 0.0, 0
            state["train_seconds"] = base_seconds + time.perf_counter() - start_time
            patience = cfg.early_stopping_patience
            if patience is not None and state["bad_epochs"] >= patience and state["epoch"] < cfg.epochs:
                stopped_early = state["stopped_early"] = True
                emit({"type": "early_stop", "epoch": state["epoch"], "best_epoch": state["best_epoch"]})
                save(True)
                break
            save(True)
    except _Stopped:
        raise TrainingCancelled(f"training stopped by request at step {state['step']}") from None
    finally:
        model.prefix_eval = prefix_eval_before
        for m, mode in modes:
            m.training = mode

    if best_tensors is not None:
        model.load_adapter_state_dict(best_tensors)
    best_metrics = {}
    if state["best_epoch"] is not None:
        best_metrics = state["history"][state["best_epoch"] - 1].get("metrics", {})
    return TrainResult(
        metrics=best_metrics, best_epoch=state["best_epoch"], history=state["history"], steps=state["step"],
        train_seconds=state["train_seconds"], truncated_rows=train_data.truncated, stopped_early=stopped_early,
        prefix_cache_bytes=cache.nbytes if cache is not None else 0, resumed_from_step=resumed_from,
        main_metric=main if validation is not None else None,
        extra={"validation_carved_rows": carved} if carved else {},
    )



def check_finite(weights: bytes | dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteError naming the tensors of an adapter (safetensors bytes or tensors) that hold NaN or
    infinite values: such an adapter is never stored."""
    if isinstance(weights, bytes | bytearray):
        from safetensors.torch import load as st_load

        weights = st_load(bytes(weights))
    bad = sorted(name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"the adapter holds NaN or infinite values in {len(bad)} tensor(s) ({shown}); "
                             "it was not stored. Lower learning_rate or weight_decay", detail={"tensors": bad[:20]})


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "no":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if amp == "auto" else None


@torch.no_grad()
def predict_logits(model: SpafitModel, data: Encoded, *, batch_size: int = 64, device: torch.device | None = None,
                   amp_dtype: torch.dtype | None = None, pad_id: int = 0) -> torch.Tensor:
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data.features[start:start + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(batch).float().cpu())
    return torch.cat(out)


def evaluate(model: SpafitModel, data: Encoded, metrics: list[str], *, batch_size: int = 64,
             device: torch.device | None = None, amp_dtype: torch.dtype | None = None, pad_id: int = 0,
             compute=None) -> dict[str, float]:
    if compute is None:
        from .metrics import compute_metrics as compute
    was_training = model.training
    logits = predict_logits(model, data, batch_size=batch_size, device=device, amp_dtype=amp_dtype, pad_id=pad_id)
    model.train(was_training)
    preds = predictions(model.task.task_type, logits)
    return {k: float(v) for k, v in compute(model.task.task_type, preds, data.labels.numpy(), metrics).items()}
