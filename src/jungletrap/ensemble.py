"""Ensemble stage: blend the models' predictions, write ``submission.csv`` and ``metrics.json``.

The blend (``ensemble.method``: ``weights`` fitted on out-of-fold predictions, or a plain ``mean``) and its
probability clip are chosen on out-of-fold predictions only. ``submission.csv`` has exactly
the rows (in the same order) and the columns of the submission-format file, whatever order the catalog used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from jungletrap.catalog import CATALOG_NAME, read_competition_csv
from jungletrap.config import JobConfig
from jungletrap.metrics import fold_prior_predictions, mean_log_loss, summarize
from jungletrap.schema import CLASS_NAMES, FILENAME, FOLD, SPLIT, SPLIT_TRAIN, VIDEO_ID
from jungletrap.storage import write_json_atomic, write_text_atomic
from jungletrap.train import prediction_path, read_predictions

__all__ = ["run_ensemble", "blend", "fit_weights", "choose_clip", "write_submission", "CLIP_CANDIDATES"]

log = logging.getLogger(__name__)

CLIP_CANDIDATES: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


def blend(predictions: list[pd.DataFrame], weights: np.ndarray | None = None) -> pd.DataFrame:
    """The weighted mean (default: plain mean) of the models' probabilities, aligned on ``video_id``."""
    index = predictions[0].index
    stacked = np.stack([p.loc[index, list(CLASS_NAMES)].to_numpy(np.float64) for p in predictions])
    w = np.full(len(predictions), 1 / len(predictions)) if weights is None else np.asarray(weights, np.float64)
    return pd.DataFrame(np.tensordot(w, stacked, axes=1), index=index, columns=list(CLASS_NAMES))


def fit_weights(truth: np.ndarray, predictions: list[np.ndarray]) -> np.ndarray:
    """Global non-negative model weights summing to one that minimise the out-of-fold metric.

    One weight per model (not per class) keeps the fit to M-1 free numbers, so fitting on the same OOF
    predictions it is scored on adds little optimism; the weights include each single model, so the blend's
    OOF loss is never above the best model's.
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


def choose_clip(truth: np.ndarray, proba: np.ndarray, setting: float | str) -> float:
    """The configured clip, or with ``auto`` the candidate that gives the best out-of-fold score."""
    if setting != "auto":
        return float(setting)
    scores = {c: mean_log_loss(truth, np.clip(proba, c, 1 - c)) for c in CLIP_CANDIDATES}
    return min(scores, key=lambda c: (scores[c], -c))


def write_submission(test: pd.DataFrame, format_path: str | Path, out_path: Path) -> pd.DataFrame:
    """Write predictions in the exact rows and columns of the submission-format file."""
    fmt = read_competition_csv(format_path)
    missing = set(fmt[FILENAME]) - set(test.index)
    if missing:
        raise ValueError(f"{len(missing)} clips of {format_path} have no prediction, e.g. {sorted(missing)[:3]}")
    sub = test.loc[fmt[FILENAME], list(CLASS_NAMES)].reset_index(drop=True)
    sub.insert(0, FILENAME, fmt[FILENAME].to_numpy())
    write_text_atomic(sub.to_csv(index=False, float_format="%.6g"), out_path)
    return sub


def run_ensemble(cfg: JobConfig, run_dir: Path) -> dict[str, Any]:
    """Blend OOF and test predictions, pick the clip on OOF, write submission.csv and metrics.json."""
    models = list(cfg.train.models)
    catalog = pd.read_parquet(run_dir / CATALOG_NAME)
    train = catalog[catalog[SPLIT] == SPLIT_TRAIN].set_index(VIDEO_ID)
    truth = train[list(CLASS_NAMES)].to_numpy(np.float64)
    oof = {m: read_predictions(prediction_path(run_dir, "oof", m)).loc[train.index] for m in models}
    test = {m: read_predictions(prediction_path(run_dir, "test", m)) for m in models}
    weights = (fit_weights(truth, [p.to_numpy() for p in oof.values()]) if cfg.ensemble.method == "weights"
               else np.full(len(models), 1 / len(models)))
    oof_blend = blend(list(oof.values()), weights)
    clip = choose_clip(truth, oof_blend.to_numpy(), cfg.ensemble.clip)
    oof_blend = oof_blend.clip(clip, 1 - clip)
    test_blend = blend(list(test.values()), weights).clip(clip, 1 - clip)
    prior = fold_prior_predictions(truth, train[FOLD].to_numpy())
    prior_clip = choose_clip(truth, prior, cfg.ensemble.clip)  # the baseline gets the same clip choice
    prior = np.clip(prior, prior_clip, 1 - prior_clip)
    metrics: dict[str, Any] = {
        "oof": {m: summarize(truth, p.to_numpy(), CLASS_NAMES) for m, p in oof.items()},
        "prior_baseline_oof": summarize(truth, prior, CLASS_NAMES),
        "clip": clip,
        "models": models,
        "weights": {m: float(w) for m, w in zip(models, weights, strict=True)},
    }
    metrics["oof"]["blend"] = summarize(truth, oof_blend.to_numpy(), CLASS_NAMES)
    training = run_dir / "train_metrics.json"
    if training.exists():  # per-fold scores and training curves, kept with the rest of the metrics
        metrics["training"] = json.loads(training.read_text(encoding="utf-8"))
    if cfg.data.test_labels:
        metrics["test"] = _test_scores(cfg.data.test_labels, {**test, "blend": test_blend})
    write_submission(test_blend, cfg.data.submission_format, run_dir / "submission.csv")
    write_json_atomic(metrics, run_dir / "metrics.json")
    blend_score = metrics["oof"]["blend"]["mean_log_loss"]
    log.info("ensemble: blend OOF log loss %.5f (prior baseline %.5f, clip %g)", blend_score,
             metrics["prior_baseline_oof"]["mean_log_loss"], clip)
    return {"blend_oof_log_loss": round(blend_score, 6),
            "prior_oof_log_loss": round(metrics["prior_baseline_oof"]["mean_log_loss"], 6)}


def _test_scores(labels_path: str, predictions: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Scores on held-out test labels when the data has them (the demo set does; the competition did not)."""
    truth = read_competition_csv(labels_path).set_index(FILENAME)
    return {m: summarize(truth[list(CLASS_NAMES)].to_numpy(np.float64),
                         p.loc[truth.index, list(CLASS_NAMES)].to_numpy(), CLASS_NAMES)
            for m, p in predictions.items()}
