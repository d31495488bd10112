"""Ensemble stage: blend the models' predictions, write ``submission.csv`` and ``metrics.json``.

The models blended are every model the train stage wrote (:func:`jungletrap.train.model_names`: ``xgb``, and
``head`` plus ``head_<backbone>`` for each other backbone of a run with several).

Everything here is fitted on out-of-fold predictions only: the blend (``ensemble.method``; ``auto`` picks
``mean``, ``weights``, ``shared_stacker`` or ``stacker`` by nested OOF score, see :mod:`jungletrap.blenders`)
and the probability clip (chosen on the blender's predictions of the rows it was fitted on). The fitted blender is saved
as ``models/ensemble.json`` (``predict`` applies it), the blended predictions as ``oof/blend.parquet`` and
``test/blend.parquet``. ``submission.csv`` has exactly the rows (in the same order) and the columns of the
submission-format file, whatever order the catalog used.
The blend's out-of-fold score is nested: each fold is blended and clipped by a blender, a clip and (``auto``) a
method chosen on the other folds only; the class-prior baseline's clip is chosen the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from jungletrap.blenders import (
    CLIP_CANDIDATES,
    apply_blender,
    best_method,
    choose_clip,
    fit_clipped_blender,
    fit_weights,
    nested_auto_predictions,
    nested_clip,
    nested_predictions,
    nested_scores,
)
from jungletrap.catalog import CATALOG_NAME, read_competition_csv
from jungletrap.config import JobConfig
from jungletrap.metrics import fold_prior_predictions, summarize
from jungletrap.schema import CLASS_NAMES, FILENAME, FOLD, SPLIT, SPLIT_TRAIN, VIDEO_ID
from jungletrap.storage import RunPath, read_parquet, write_json_atomic, write_parquet_atomic, write_text_atomic
from jungletrap.train import model_names, prediction_path, read_predictions

__all__ = [
    "CLIP_CANDIDATES",
    "ENSEMBLE_MODEL",
    "blend",
    "blend_frames",
    "choose_clip",
    "fit_blend",
    "fit_weights",
    "run_ensemble",
    "write_submission",
]

log = logging.getLogger(__name__)

ENSEMBLE_MODEL = Path("models") / "ensemble.json"


def blend(predictions: list[pd.DataFrame], weights: np.ndarray | None = None) -> pd.DataFrame:
    """The weighted mean (default: plain mean) of the models' probabilities, aligned on ``video_id``."""
    w = np.full(len(predictions), 1 / len(predictions)) if weights is None else np.asarray(weights, np.float64)
    return blend_frames({"method": "weights", "weights": w.tolist()}, predictions)


def blend_frames(params: dict[str, Any], predictions: list[pd.DataFrame]) -> pd.DataFrame:
    """Apply fitted blender parameters to per-model frames aligned on ``video_id`` (first frame's order)."""
    index = predictions[0].index
    arrays = [p.loc[index, list(CLASS_NAMES)].to_numpy(np.float64) for p in predictions]
    return pd.DataFrame(apply_blender(params, arrays), index=index, columns=list(CLASS_NAMES))


def write_submission(test: pd.DataFrame, format_path: str | Path, out_path: RunPath,
                     storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write predictions in the exact rows and columns of the submission-format file (a path or URL)."""
    fmt = read_competition_csv(format_path, storage_options)
    missing = set(fmt[FILENAME]) - set(test.index)
    if missing:
        raise ValueError(f"{len(missing)} clips of {format_path} have no prediction, e.g. {sorted(missing)[:3]}")
    sub = test.loc[fmt[FILENAME], list(CLASS_NAMES)].reset_index(drop=True)
    sub.insert(0, FILENAME, fmt[FILENAME].to_numpy())
    write_text_atomic(sub.to_csv(index=False, float_format="%.6g"), out_path)
    return sub


def _write_blend(frame: pd.DataFrame, path: RunPath) -> None:
    out = frame.rename_axis(VIDEO_ID).reset_index().sort_values(VIDEO_ID)
    write_parquet_atomic(pa.Table.from_pandas(out, preserve_index=False), path)


def fit_blend(cfg: JobConfig, truth: np.ndarray, oof: list[np.ndarray], folds: np.ndarray
              ) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """What was chosen (method, every method's nested scores, with ``auto`` the method each fold's reported blend
    used), the blender + clip fitted on every OOF row (applied to the test set), and the blend's nested OOF
    predictions: each fold blended and clipped by a blender, clip and (``auto``) method chosen on the other
    folds alone, so the blend's reported score is as honest as the single models' and comparable to them."""
    clip = cfg.ensemble.clip
    if len(oof) == 1:
        method, chosen = "mean", {"method": "mean", "nested_oof_log_loss": {}}
        nested = nested_predictions(method, truth, oof, folds, clip=clip)
    elif cfg.ensemble.method == "auto":
        scores = nested_scores(truth, oof, folds, clip=clip)
        method = best_method(scores)
        nested, per_fold = nested_auto_predictions(truth, oof, folds, clip=clip)
        chosen = {"method": method, "nested_oof_log_loss": scores,
                  "fold_methods": {str(k): m for k, m in per_fold.items()}}
    else:
        method = cfg.ensemble.method
        chosen = {"method": method, "nested_oof_log_loss": nested_scores(truth, oof, folds, clip=clip)}
        nested = nested_predictions(method, truth, oof, folds, clip=clip)
    return chosen, fit_clipped_blender(method, truth, oof, clip), nested


def run_ensemble(cfg: JobConfig, run_dir: RunPath) -> dict[str, Any]:
    """Fit the blend and clip on OOF predictions, write submission.csv, metrics.json and the blender."""
    models = model_names(cfg)  # what the train stage wrote: a head per backbone, XGBoost
    catalog = read_parquet(run_dir / CATALOG_NAME)
    train = catalog[catalog[SPLIT] == SPLIT_TRAIN].set_index(VIDEO_ID)
    truth = train[list(CLASS_NAMES)].to_numpy(np.float64)
    oof = {m: read_predictions(prediction_path(run_dir, "oof", m)).loc[train.index] for m in models}
    test = {m: read_predictions(prediction_path(run_dir, "test", m)) for m in models}
    arrays, folds = [p.to_numpy() for p in oof.values()], train[FOLD].to_numpy()
    chosen, params, nested_blend = fit_blend(cfg, truth, arrays, folds)
    method, nested = chosen["method"], chosen["nested_oof_log_loss"]
    params["models"] = models
    clip = params["clip"]
    oof_blend = pd.DataFrame(nested_blend, index=train.index, columns=list(CLASS_NAMES))
    test_blend = blend_frames(params, list(test.values())).clip(clip, 1 - clip)
    prior = fold_prior_predictions(truth, folds)
    prior = nested_clip(truth, prior, folds, cfg.ensemble.clip)  # the baseline gets the same nested clip choice
    metrics: dict[str, Any] = {
        "oof": {m: summarize(truth, p.to_numpy(), CLASS_NAMES) for m, p in oof.items()},
        "prior_baseline_oof": summarize(truth, prior, CLASS_NAMES),
        "clip": clip,
        "models": models,
        "ensemble": chosen,
    }
    if "weights" in params:
        metrics["weights"] = {m: float(w) for m, w in zip(models, params["weights"], strict=True)}
    if method == "shared_stacker":
        metrics["logit_coef"] = {m: float(c) for m, c in zip(models, params["coef"], strict=True)}
    metrics["oof"]["blend"] = summarize(truth, oof_blend.to_numpy(), CLASS_NAMES)
    training = run_dir / "train_metrics.json"
    if training.exists():  # per-fold scores and training curves, kept with the rest of the metrics
        metrics["training"] = json.loads(training.read_text(encoding="utf-8"))
    if cfg.data.test_labels:
        metrics["test"] = _test_scores(cfg.data.test_labels, {**test, "blend": test_blend},
                                       cfg.data.storage_options)
    write_json_atomic(params, run_dir / ENSEMBLE_MODEL)
    _write_blend(oof_blend, prediction_path(run_dir, "oof", "blend"))
    _write_blend(test_blend, prediction_path(run_dir, "test", "blend"))
    write_submission(test_blend, cfg.data.submission_format, run_dir / "submission.csv", cfg.data.storage_options)
    write_json_atomic(metrics, run_dir / "metrics.json")
    blend_score = metrics["oof"]["blend"]["mean_log_loss"]
    per_fold = chosen.get("fold_methods")
    log.info("ensemble: %s blender saved; blend OOF log loss %.5f%s (prior baseline %.5f, clip %g; nested OOF %s)",
             method, blend_score, f", each fold by the method that won on the others: {per_fold}" if per_fold else "",
             metrics["prior_baseline_oof"]["mean_log_loss"], clip, {m: round(s, 5) for m, s in nested.items()})
    return {"method": method, "blend_oof_log_loss": round(blend_score, 6),
            "prior_oof_log_loss": round(metrics["prior_baseline_oof"]["mean_log_loss"], 6)}


def _test_scores(labels_path: str, predictions: dict[str, pd.DataFrame],
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scores on held-out test labels when the data has them (the demo set does; the competition did not)."""
    truth = read_competition_csv(labels_path, storage_options).set_index(FILENAME)
    return {m: summarize(truth[list(CLASS_NAMES)].to_numpy(np.float64),
                         p.loc[truth.index, list(CLASS_NAMES)].to_numpy(), CLASS_NAMES)
            for m, p in predictions.items()}
