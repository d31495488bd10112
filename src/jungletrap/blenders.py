"""Ways to combine the models' probabilities, fitted on out-of-fold predictions only, saved as JSON.

- ``mean``: the plain average;
- ``weights``: one non-negative weight per model (summing to one), fitted with scipy on the metric;
- ``stacker``: per class, a logistic regression on the models' logits for that class (the seed used a
  stacker over its folds; a linear one per class keeps it to M+1 numbers per class).
``auto`` picks among them by **nested** out-of-fold score: each fold's blend and probability clip are fitted on
the other folds' OOF predictions only, so the choice is not biased towards the most flexible method and the blend's
reported score never saw the labels it is scored on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from jungletrap.metrics import mean_log_loss

__all__ = [
    "BLEND_METHODS",
    "CLIP_CANDIDATES",
    "apply_blender",
    "choose_clip",
    "fit_blender",
    "fit_clipped_blender",
    "fit_weights",
    "nested_clip",
    "nested_predictions",
    "nested_scores",
]

BLEND_METHODS: tuple[str, ...] = ("mean", "weights", "stacker")
#: Probability clips ``auto`` chooses from.
CLIP_CANDIDATES: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
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


def choose_clip(truth: np.ndarray, proba: np.ndarray, setting: float | str) -> float:
    """The configured clip, or with ``auto`` the candidate that gives the best score on ``truth``."""
    if setting != "auto":
        return float(setting)
    scores = {c: mean_log_loss(truth, np.clip(proba, c, 1 - c)) for c in CLIP_CANDIDATES}
    return min(scores, key=lambda c: (scores[c], -c))


def fit_clipped_blender(method: str, truth: np.ndarray, predictions: list[np.ndarray], clip: float | str
                        ) -> dict[str, Any]:
    """:func:`fit_blender`, then the probability clip chosen on the same rows' blend (``params["clip"]``).

    This is the whole procedure the ensemble fits on OOF predictions; :func:`nested_predictions` repeats it per fold.
    """
    params = fit_blender(method, truth, predictions)
    params["clip"] = choose_clip(truth, apply_blender(params, predictions), clip)
    return params


def nested_predictions(method: str, truth: np.ndarray, predictions: list[np.ndarray], folds: np.ndarray, *,
                       clip: float | str = 0.0) -> np.ndarray:
    """Truly out-of-fold blended predictions: each fold blended and clipped by a blender and clip fitted on the
    other folds only (:func:`fit_clipped_blender`), so no fold's labels reach its own predictions."""
    nested = np.empty_like(truth, dtype=np.float64)
    for k in np.unique(folds):
        held = folds == k
        params = fit_clipped_blender(method, truth[~held], [p[~held] for p in predictions], clip)
        nested[held] = np.clip(apply_blender(params, [p[held] for p in predictions]), params["clip"],
                               1 - params["clip"])
    return nested


def nested_clip(truth: np.ndarray, proba: np.ndarray, folds: np.ndarray, clip: float | str) -> np.ndarray:
    """``proba`` (already out of fold) with each fold clipped by the clip chosen on the other folds."""
    out = np.empty_like(proba, dtype=np.float64)
    for k in np.unique(folds):
        held = folds == k
        c = choose_clip(truth[~held], proba[~held], clip)
        out[held] = np.clip(proba[held], c, 1 - c)
    return out


def nested_scores(truth: np.ndarray, predictions: list[np.ndarray], folds: np.ndarray, *,
                  clip: float | str = 0.0) -> dict[str, float]:
    """Nested OOF metric of every method (blender and clip fitted without the fold scored)."""
    return {m: mean_log_loss(truth, nested_predictions(m, truth, predictions, folds, clip=clip))
            for m in BLEND_METHODS}
