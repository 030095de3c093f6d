"""Evaluation metrics in plain numpy: classification, multi-label and regression, and the default set per task.

Every metric returns a Python float and never NaN: a degenerate input (a constant prediction for Pearson or
Matthews, no positives for F1) scores 0.0, as scikit-learn does with `zero_division=0`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .config import TASK_TYPES
from .errors import ConfigError

ArrayLike = Sequence | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of the same non-zero length."""
    p, y = np.asarray(predictions, dtype=dtype), np.asarray(labels, dtype=dtype)
    if p.shape[:1] != y.shape[:1]:
        raise ValueError(f"predictions and labels differ in length: {p.shape[:1]} vs {y.shape[:1]}")
    if p.size == 0 or y.size == 0:
        raise ValueError("cannot compute a metric over zero examples")
    return p, y


def _ids(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = _pair(predictions, labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"class-id metrics take 1-D arrays of class ids; got shapes {p.shape} and {y.shape} "
                         "(take the argmax of logits first)")
    return p, y


def _f1_counts(tp: float, fp: float, fn: float) -> float:
    """F1 = 2TP / (2TP + FP + FN), which equals 2PR / (P + R); 0.0 when there is nothing to score."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches."""
    p, y = _ids(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of the class `positive` (label index 1 by default, e.g. MRPC 'equivalent')."""
    p, y = _ids(predictions, labels)
    extra = set(np.unique(np.concatenate([p, y])).tolist()) - {0, 1}
    if extra:
        raise ValueError(f"f1 is binary (class ids 0 and 1); found {sorted(extra)[:5]}: use macro_f1")
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return _f1_counts(tp, fp, fn)


def macro_f1(predictions: ArrayLike, labels: ArrayLike, num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1 over `range(num_labels)`, or over every class seen in either array."""
    p, y = _ids(predictions, labels)
    if num_labels is None:  # the classes seen in either array, as ids 0..k-1
        classes, inverse = np.unique(np.concatenate([p, y]), return_inverse=True)
        k, p, y = len(classes), inverse[: len(p)], inverse[len(p):]
    else:
        k, p, y = num_labels, _class_ids(p), _class_ids(y)
    if k == 0:
        return float("nan")
    # per class in one pass each (a loop over classes was k passes over the rows: 10,000 labels x 1M rows); ids
    # outside 0..k-1 count against the classes they are compared with, as before
    tp = np.bincount(y[(p == y) & (y >= 0)], minlength=k)[:k]
    fp = np.bincount(p[p >= 0], minlength=k)[:k] - tp
    fn = np.bincount(y[y >= 0], minlength=k)[:k] - tp
    scores = [_f1_counts(a, b, c) for a, b, c in zip(tp, fp, fn, strict=True)]
    return float(np.mean(scores))


def _class_ids(a: np.ndarray) -> np.ndarray:
    """Whole numbers as int64 class ids; any other value -1, which matches no class of range(num_labels)."""
    if a.dtype.kind == "O":  # Python objects (a list holding a None, a pandas object column): each on its own
        return np.array([int(v) if isinstance(v, int | float | np.number) and float(v).is_integer() else -1
                         for v in a.tolist()], dtype=np.int64).reshape(a.shape)
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return np.where(np.mod(a, 1) == 0, a, -1).astype(np.int64)
    return np.full(a.shape, -1, dtype=np.int64)


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation; for K classes Gorodkin's R_K (what scikit-learn computes). 0.0 when undefined."""
    p, y = _ids(predictions, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    confusion = np.zeros((k, k), dtype=np.float64)  # (true, predicted)
    np.add.at(confusion, (inverse[:n], inverse[n:]), 1.0)
    t, q = confusion.sum(axis=1), confusion.sum(axis=0)  # true / predicted counts per class
    c, s = np.trace(confusion), float(n)
    denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - t @ q) / denom) if denom > 0 else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson's r; 0.0 when either side is constant (or not finite)."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    pc, yc = p.ravel() - p.mean(), y.ravel() - y.mean()
    denom = np.sqrt(np.sum(pc * pc) * np.sum(yc * yc))
    if not np.isfinite(denom) or denom == 0:
        return 0.0
    r = float(np.sum(pc * yc) / denom)
    return min(1.0, max(-1.0, r)) if np.isfinite(r) else 0.0


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks; ties get the average of the ranks they span (scipy's method='average')."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_mask = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts_mask) - 1  # tie group of each sorted position
    starts = np.flatnonzero(starts_mask)
    counts = np.diff(np.r_[starts, len(x)])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = (starts + (counts + 1) / 2.0)[group]  # positions start+1 .. start+count, averaged
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    return pearson(rankdata(p), rankdata(y))


def mse(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Mean squared error (lower is better)."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    return float(np.mean((p.ravel() - y.ravel()) ** 2))


def _multi_hot(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = _pair(predictions, labels, dtype=np.float64)
    if p.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"multi-label metrics take two 0/1 matrices of the same shape (examples, labels); "
                         f"got {p.shape} and {y.shape}")
    for name, a in (("predictions", p), ("labels", y)):
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"multi-label {name} must be 0/1 (threshold the probabilities first)")
    return p.astype(bool), y.astype(bool)


def micro_f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """F1 over every (example, label) cell pooled together."""
    p, y = _multi_hot(predictions, labels)
    return _f1_counts(np.sum(p & y), np.sum(p & ~y), np.sum(~p & y))


def subset_accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of examples whose whole label set is predicted exactly."""
    p, y = _multi_hot(predictions, labels)
    return float(np.mean(np.all(p == y, axis=1)))


# Which metrics apply to which task type; each takes (predictions, labels).
METRICS: dict[str, dict[str, Callable[[ArrayLike, ArrayLike], float]]] = {
    "single_label_classification": {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1,
                                    "matthews_corrcoef": matthews_corrcoef},
    "multi_label_classification": {"micro_f1": micro_f1, "subset_accuracy": subset_accuracy},
    "regression": {"pearson": pearson, "spearman": spearman, "mse": mse},
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "f1": True, "macro_f1": True, "matthews_corrcoef": True, "micro_f1": True,
    "subset_accuracy": True, "pearson": True, "spearman": True, "mse": False, "loss": False,
}


def _check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task_type must be one of {', '.join(TASK_TYPES)}; got {task_type!r}", field="task_type")


def default_metrics(task_type: str, num_labels: int) -> list[str]:
    """The metrics reported by default; the first is the main one (model selection, early stopping)."""
    _check_task_type(task_type)
    if task_type == "single_label_classification":
        return ["accuracy", "f1" if num_labels == 2 else "macro_f1"]
    if task_type == "multi_label_classification":
        return ["micro_f1", "subset_accuracy"]
    return ["pearson", "spearman"]


def main_metric(task_type: str, num_labels: int, names: Sequence[str] | None = None) -> str:
    """The metric that decides which checkpoint is best: the first of `names`, else of the defaults."""
    return list(names)[0] if names else default_metrics(task_type, num_labels)[0]


def is_better(name: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` (None: nothing yet) for the metric `name`."""
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER.get(name, True) else value < best


def check_metric_names(task_type: str, names: Sequence[str]) -> list[str]:
    """`names` as a list, or a ConfigError naming the metrics `task_type` allows."""
    _check_task_type(task_type)
    allowed = METRICS[task_type]
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ConfigError("metrics must name at least one metric", field="metrics")
    for name in names:
        if name not in allowed:
            raise ConfigError(f"unknown metric {name!r} for {task_type}; allowed: {', '.join(allowed)}",
                              field="metrics")
    return names


def compute_metrics(task_type: str, predictions: ArrayLike, labels: ArrayLike,
                    names: Sequence[str] | None = None, *, num_labels: int | None = None) -> dict[str, float]:
    """Each metric in `names` by name, in that order. Predictions are class ids (single-label), 0/1 matrices
    (multi-label) or floats (regression). `names=None` uses `default_metrics(task_type, num_labels)`; pass
    `num_labels` then, or it is taken as the largest class id seen + 1."""
    if names is None:
        _check_task_type(task_type)
        if num_labels is None:
            y = np.asarray(labels)
            if task_type == "single_label_classification":
                num_labels = max(2, int(max(np.max(y), np.max(np.asarray(predictions)))) + 1) if y.size else 2
            else:
                num_labels = y.shape[-1] if y.ndim == 2 else 1
        names = default_metrics(task_type, num_labels)
    names = check_metric_names(task_type, names)
    return {name: METRICS[task_type][name](predictions, labels) for name in names}
