"""Turning logits into predictions: label, score and class scores (top_k) for classification,
independent sigmoid scores for multi-label, the value for regression."""

from __future__ import annotations

from typing import Any

import torch

from .config import TaskSpec


def postprocess(task: TaskSpec, logits: torch.Tensor, top_k: int | None = None,
                threshold: float = 0.5) -> dict[str, Any]:
    """One row's prediction. `logits` has shape (num_labels,)."""
    logits = logits.float()
    if task.task_type == "regression":
        value = float(logits.reshape(-1)[0])
        return {"label": None, "score": value, "value": value, "scores": []}
    if task.task_type == "multi_label_classification":
        probs = torch.sigmoid(logits)
        ranked = _ranked(task, probs, top_k)
        return {"label": ranked[0]["label"], "score": ranked[0]["score"], "scores": ranked,
                "labels": [task.labels[i] for i in range(len(task.labels)) if probs[i] >= threshold]}
    probs = torch.softmax(logits, dim=-1)
    ranked = _ranked(task, probs, top_k)
    return {"label": ranked[0]["label"], "score": ranked[0]["score"], "scores": ranked}


def _ranked(task: TaskSpec, probs: torch.Tensor, top_k: int | None) -> list[dict[str, Any]]:
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    if top_k is not None:
        order = order[: max(1, top_k)]
    return [{"label": task.labels[i], "score": float(probs[i])} for i in order]
