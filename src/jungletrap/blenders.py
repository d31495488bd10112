"""Ways to combine the models' probabilities, fitted on out-of-fold predictions only, saved as JSON.

- ``mean``: the plain average;
- ``weights``: one non-negative weight per model (summing to one), fitted with scipy on the metric;
- ``stacker``: per class, a logistic regression on the models' logits for that class (the seed used a
  stacker over its folds; a linear one per class keeps it to M+1 numbers per class).
``auto`` picks among them by **nested** out-of-fold score: each fold's blend is fitted on the other folds'
OOF predictions only, so the choice is not biased towards the most flexible method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from jungletrap.metrics import mean_log_loss

__all__ = [
    "BLEND_METHODS",
    "apply_blender",
    "fit_blender",
    "fit_weights",
    "nested_predictions",
    "nested_scores",
]

BLEND_METHODS: tuple[str, ...] = ("mean", "weights", "stacker")
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_weights(truth: np.ndarray, predictions: list[np.ndarray]) -> np.ndarray:
    """Global non-negative model weights summing to one that minimise the out-of-fold metric.

    The search space includes each single model, so the blend's OOF loss is never above the best model's.
    """
    stacked = np.stack(predictions)
    if len(predictions) == 1:
        return np.ones(1)

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return mean_log_loss(truth, np.tensordot(w / w.sum(), stacked, axes=1))

    starts = [np.zeros(len(predictions))] + [np.eye(len(predictions))[i] * 8 for i in range(len(predictions))]
    best = min((minimize(loss, z0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7}) for z0 in starts),
               key=lambda r: r.fun)
    w = np.exp(best.x - best.x.max())
    return w / w.sum()


def _fit_stacker(truth: np.ndarray, predictions: list[np.ndarray]) -> dict[str, Any]:
    coef, intercept = [], []
    for c in range(truth.shape[1]):
        y = truth[:, c]
        if y.min() == y.max():  # a class with one label value: predict its (clipped) rate
            rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
            coef.append([0.0] * len(predictions))
            intercept.append(float(np.log(rate / (1 - rate))))
            continue
        x = np.stack([_logit(p[:, c]) for p in predictions], axis=1)
        model = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
        coef.append(model.coef_[0].tolist())
        intercept.append(float(model.intercept_[0]))
    return {"coef": coef, "intercept": intercept}


def fit_blender(method: str, truth: np.ndarray, predictions: list[np.ndarray]) -> dict[str, Any]:
    """Fit ``method`` on OOF predictions (one (N, C) array per model); return its JSON-able parameters."""
    if method == "mean":
        return {"method": "mean", "weights": [1 / len(predictions)] * len(predictions)}
    if method == "weights":
        return {"method": "weights", "weights": fit_weights(truth, predictions).tolist()}
    if method == "stacker":
        return {"method": "stacker", **_fit_stacker(truth, predictions)}
    raise ValueError(f"unknown blend method {method!r}; allowed: {', '.join(BLEND_METHODS)}")


def apply_blender(params: dict[str, Any], predictions: list[np.ndarray]) -> np.ndarray:
    """Blend (N, C) probability arrays (same model order as at fit time) with fitted parameters."""
    if params["method"] in ("mean", "weights"):
        return np.tensordot(np.asarray(params["weights"]), np.stack(predictions), axes=1)
    coef, intercept = np.asarray(params["coef"]), np.asarray(params["intercept"])  # (C, M), (C,)
    logits = np.stack([_logit(p) for p in predictions], axis=-1)  # (N, C, M)
    z = (logits * coef[None]).sum(axis=-1) + intercept[None]
    return 1 / (1 + np.exp(-z))


def nested_predictions(method: str, truth: np.ndarray, predictions: list[np.ndarray], folds: np.ndarray
                       ) -> np.ndarray:
    """Truly out-of-fold blended predictions: each fold blended by a blender fitted on the other folds."""
    nested = np.empty_like(truth, dtype=np.float64)
    for k in np.unique(folds):
        held = folds == k
        params = fit_blender(method, truth[~held], [p[~held] for p in predictions])
        nested[held] = apply_blender(params, [p[held] for p in predictions])
    return nested


def nested_scores(truth: np.ndarray, predictions: list[np.ndarray], folds: np.ndarray) -> dict[str, float]:
    """Nested OOF metric of every method."""
    return {m: mean_log_loss(truth, nested_predictions(m, truth, predictions, folds)) for m in BLEND_METHODS}
