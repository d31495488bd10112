"""Ways to combine the models' probabilities, fitted on out-of-fold predictions only, saved as JSON.

- ``mean``: the plain average;
- ``weights``: one non-negative weight per model (summing to one), fitted with scipy on the metric;
- ``shared_stacker``: one logistic regression on the models' logits shared by every class (M+1 numbers in all):
  it reweights and recalibrates (a coefficient sum above one sharpens under-confident models) with too few
  numbers to overfit a few hundred clips;
- ``stacker``: per class, a logistic regression on the models' logits for that class (the seed used a
  stacker over its folds; a linear one per class keeps it to M+1 numbers per class, 24 times as many in all).
``auto`` picks among them by **nested** out-of-fold score: each fold's blend and probability clip are fitted on
the other folds' OOF predictions only, so the choice is not biased towards the most flexible method.
The blend's reported score nests the choice too (:func:`nested_auto_predictions`): each fold is blended by the
method that won on the other folds alone, so picking the luckiest of four methods does not flatter it either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from jungletrap.metrics import METRIC_EPS, mean_log_loss

__all__ = [
    "BLEND_METHODS",
    "CLIP_CANDIDATES",
    "apply_blender",
    "best_method",
    "choose_clip",
    "fit_blender",
    "fit_clipped_blender",
    "fit_weights",
    "nested_auto_predictions",
    "nested_clip",
    "nested_predictions",
    "nested_scores",
]

BLEND_METHODS: tuple[str, ...] = ("mean", "weights", "shared_stacker", "stacker")
#: Probability clips ``auto`` chooses from.
CLIP_CANDIDATES: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_weights(truth: np.ndarray, predictions: list[np.ndarray]) -> np.ndarray:
    """Global non-negative model weights summing to one that minimise the out-of-fold metric.

    The metric is convex in the weights; L-BFGS-B with its analytic gradient finds the minimum over
    ``w = v / sum(v)``, ``v >= 0`` in a few dozen passes over the rows (0.4 s where Nelder-Mead took 41 s on
    16,000 rows x 3 models). Each single model is a candidate too, so the blend's OOF loss is never above the
    best model's.
    """
    if len(predictions) == 1:
        return np.ones(1)
    stacked = np.clip(np.stack(predictions).reshape(len(predictions), -1), METRIC_EPS, 1 - METRIC_EPS)
    y = np.asarray(truth, np.float64).ravel()

    def loss_and_grad(v: np.ndarray) -> tuple[float, np.ndarray]:
        total = max(v.sum(), 1e-12)
        p = np.clip((v / total) @ stacked, METRIC_EPS, 1 - METRIC_EPS)
        loss = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
        d_w = -stacked @ (y / p - (1 - y) / (1 - p)) / y.size  # d loss / d w_m
        return float(loss), (d_w - (v / total) @ d_w) / total

    fitted = minimize(loss_and_grad, np.full(len(predictions), 1 / len(predictions)), jac=True, method="L-BFGS-B",
                      bounds=[(0, None)] * len(predictions))
    candidates = [fitted.x / max(fitted.x.sum(), 1e-12), *np.eye(len(predictions))]
    return min(candidates, key=lambda w: loss_and_grad(w)[0])


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


def _fit_shared_stacker(truth: np.ndarray, predictions: list[np.ndarray]) -> dict[str, Any]:
    """One logistic regression over every (clip, class) pair: the models' logits for that class in, its label out."""
    x = np.stack([_logit(p).ravel() for p in predictions], axis=1)
    y = truth.ravel()
    if y.min() == y.max():  # no class has both values anywhere: predict the (clipped) rate
        rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
        return {"coef": [0.0] * len(predictions), "intercept": float(np.log(rate / (1 - rate)))}
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    return {"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0])}


def fit_blender(method: str, truth: np.ndarray, predictions: list[np.ndarray]) -> dict[str, Any]:
    """Fit ``method`` on OOF predictions (one (N, C) array per model); return its JSON-able parameters."""
    if method == "mean":
        return {"method": "mean", "weights": [1 / len(predictions)] * len(predictions)}
    if method == "weights":
        return {"method": "weights", "weights": fit_weights(truth, predictions).tolist()}
    if method == "shared_stacker":
        return {"method": "shared_stacker", **_fit_shared_stacker(truth, predictions)}
    if method == "stacker":
        return {"method": "stacker", **_fit_stacker(truth, predictions)}
    raise ValueError(f"unknown blend method {method!r}; allowed: {', '.join(BLEND_METHODS)}")


def apply_blender(params: dict[str, Any], predictions: list[np.ndarray]) -> np.ndarray:
    """Blend (N, C) probability arrays (same model order as at fit time) with fitted parameters."""
    if params["method"] in ("mean", "weights"):
        return np.tensordot(np.asarray(params["weights"]), np.stack(predictions), axes=1)
    logits = np.stack([_logit(p) for p in predictions], axis=-1)  # (N, C, M)
    coef, intercept = np.asarray(params["coef"]), np.asarray(params["intercept"])  # stacker: (C, M), (C,)
    if params["method"] == "shared_stacker":  # (M,), ()
        coef, intercept = np.broadcast_to(coef, logits.shape[1:]), np.full(logits.shape[1], intercept)
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
        nested[held] = _blend_held(method, truth, predictions, held, clip)
    return nested


def _blend_held(method: str, truth: np.ndarray, predictions: list[np.ndarray], held: np.ndarray,
                clip: float | str) -> np.ndarray:
    """The ``held`` rows blended and clipped by ``method``'s blender and clip fitted on the other rows."""
    params = fit_clipped_blender(method, truth[~held], [p[~held] for p in predictions], clip)
    return np.clip(apply_blender(params, [p[held] for p in predictions]), params["clip"], 1 - params["clip"])


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


def best_method(scores: dict[str, float]) -> str:
    """The method with the lowest nested score; ties go to the simpler one (:data:`BLEND_METHODS` order)."""
    return min(BLEND_METHODS, key=lambda m: scores[m])


def nested_auto_predictions(truth: np.ndarray, predictions: list[np.ndarray], folds: np.ndarray, *,
                            clip: float | str = 0.0) -> tuple[np.ndarray, dict[int, str]]:
    """``auto``'s truly out-of-fold predictions: each fold is blended by the method with the best nested score
    on the other folds alone (an inner nested loop), fitted and clipped there; and the method each fold used.

    The method ``auto`` saves is chosen on every fold's nested scores; scoring that choice's own nested
    predictions would pick the luckiest of the methods on the rows it is scored on. Where the other folds are a
    single fold (two folds in all) there is nothing to nest on, and that fold gets the plain mean.
    """
    nested = np.empty_like(truth, dtype=np.float64)
    chosen: dict[int, str] = {}
    for k in np.unique(folds):
        held = folds == k
        if len(np.unique(folds[~held])) < 2:  # one other fold (2 folds, a tiny set): no inner loop to choose by
            method = "mean"
        else:
            method = best_method(nested_scores(truth[~held], [p[~held] for p in predictions], folds[~held],
                                               clip=clip))
        nested[held] = _blend_held(method, truth, predictions, held, clip)
        chosen[int(k)] = method
    return nested, chosen
