"""The competition metric and the per-class numbers the report shows.

Pri-matrix Factorization scored the mean over the 24 class columns of the binary log loss, with predictions
clipped to [1e-15, 1 - 1e-15]. ``mean_log_loss`` equals scikit-learn's ``log_loss`` computed per column and
averaged (a test checks it).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = [
    "METRIC_EPS",
    "per_class_log_loss",
    "mean_log_loss",
    "per_class_auc",
    "top1_accuracy",
    "fold_prior_predictions",
    "summarize",
]

METRIC_EPS = 1e-15


def per_class_log_loss(y_true: np.ndarray, y_pred: np.ndarray, *, eps: float = METRIC_EPS) -> np.ndarray:
    """Binary log loss of every column: shape (C,)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), eps, 1.0 - eps)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must be equal 2-D shapes")
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean(axis=0)


def mean_log_loss(y_true: np.ndarray, y_pred: np.ndarray, *, eps: float = METRIC_EPS) -> float:
    """The competition metric: per-class binary log loss averaged over the columns."""
    return float(per_class_log_loss(y_true, y_pred, eps=eps).mean())


def per_class_auc(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """ROC AUC of every column; NaN where a column has a single label value (AUC undefined)."""
    y = np.asarray(y_true)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < len(y):
            out[c] = roc_auc_score(y[:, c], y_pred[:, c])
    return out


def top1_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of clips whose most probable class is one of their true classes."""
    top = np.asarray(y_pred).argmax(axis=1)
    return float(np.asarray(y_true)[np.arange(len(top)), top].mean())


def fold_prior_predictions(y_true: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """The class-prior baseline, out of fold: each clip gets the class rates of the other folds."""
    y = np.asarray(y_true, dtype=np.float64)
    out = np.empty_like(y)
    for k in np.unique(folds):
        held = folds == k
        out[held] = y[~held].mean(axis=0)
    return out


def summarize(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> dict[str, object]:
    """Machine-readable metrics for one model: mean and per-class log loss, AUC, top-1 accuracy."""
    per_class = per_class_log_loss(y_true, y_pred)
    auc = per_class_auc(y_true, y_pred)
    return {
        "mean_log_loss": float(per_class.mean()),
        "per_class_log_loss": {name: float(v) for name, v in zip(class_names, per_class, strict=True)},
        "per_class_auc": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, auc, strict=True)},
        "top1_accuracy": top1_accuracy(y_true, y_pred),
        "n_videos": int(len(y_true)),
    }
