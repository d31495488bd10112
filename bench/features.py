"""Feature ablation: out-of-fold XGBoost loss with container/pixel features only, pooled embeddings only, all.

Run after a pipeline run: ``python -m bench.features [--run-dir runs/demo]``. Uses the run's feature table,
folds, XGBoost settings and prior base margins (single-process ``xgboost`` with the same parameters as the
train stage, so the comparison is between feature groups, not training set-ups).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from bench.common import print_table, save_results
from jungletrap.catalog import CATALOG_NAME, fold_masks
from jungletrap.config import load_config
from jungletrap.features import FEATURES_DIR
from jungletrap.metrics import fold_prior_predictions, mean_log_loss
from jungletrap.schema import CLASS_NAMES, FOLD, SPLIT, SPLIT_TRAIN, VIDEO_ID
from jungletrap.xgb import prior_margin, xgb_params

GROUPS = {
    "container_and_pixel": lambda c: not c.startswith("emb_"),
    "pooled_embeddings": lambda c: c.startswith("emb_"),
    "all": lambda c: True,
}


def oof_loss(x: np.ndarray, y: np.ndarray, folds: np.ndarray, params: dict[str, Any], rounds: int,
             early: int) -> float:
    oof = np.zeros_like(y, dtype=np.float64)
    split = np.full(len(y), SPLIT_TRAIN)
    for k in np.unique(folds):
        fit, valid = fold_masks(split, folds, k)
        margin = prior_margin(y[fit])
        dfit = xgb.DMatrix(x[fit], y[fit], base_margin=np.tile(margin, (fit.sum(), 1)))
        dvalid = xgb.DMatrix(x[valid], y[valid], base_margin=np.tile(margin, (valid.sum(), 1)))
        booster = xgb.train(params, dfit, rounds, evals=[(dvalid, "valid")], early_stopping_rounds=early,
                            verbose_eval=False)
        oof[valid] = booster.predict(dvalid, iteration_range=(0, booster.best_iteration + 1))
    return mean_log_loss(y, oof)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    catalog = pd.read_parquet(args.run_dir / CATALOG_NAME)
    train = catalog[catalog[SPLIT] == SPLIT_TRAIN].set_index(VIDEO_ID)
    feats = pd.read_parquet(args.run_dir / FEATURES_DIR).set_index(VIDEO_ID).loc[train.index]
    numeric = [c for c in feats.columns if c not in ("status", "error")]
    y, folds = train[list(CLASS_NAMES)].to_numpy(np.float32), train[FOLD].to_numpy()
    params = {**xgb_params(cfg.train.xgb, seed=cfg.run.seed, gpu=False), "nthread": 2}
    result: dict[str, Any] = {"prior_oof_log_loss": mean_log_loss(y, fold_prior_predictions(y, folds))}
    rows = [("prior_oof_log_loss", result["prior_oof_log_loss"], "class prior, out of fold")]
    for name, keep in GROUPS.items():
        cols = [c for c in numeric if keep(c)]
        start = time.perf_counter()
        loss = oof_loss(feats[cols].to_numpy(np.float32), y, folds, params, cfg.train.xgb.n_estimators,
                        cfg.train.xgb.early_stopping_rounds)
        result[f"{name}_oof_log_loss"] = loss
        rows.append((f"{name}_oof_log_loss", loss, f"{len(cols)} columns, {time.perf_counter() - start:.1f} s"))
    print_table(f"feature ablation: XGBoost out-of-fold log loss on {args.run_dir} ({len(y)} training clips)", rows)
    save_results("features", result)
    return result


if __name__ == "__main__":
    main()
