"""Train stage: every configured model over the same stratified folds, writing OOF and test predictions.

Artifacts: ``oof/<model>.parquet`` (one row per training clip), ``test/<model>.parquet`` (fold-averaged),
``models/<model>/`` (XGBoost UBJ, torch state_dicts + JSON), and ``train_metrics.json`` (per-fold scores and
curves). Each fold's models fit on the training folds minus an inner early-stopping split
(``train.early_stopping_fraction``, the same clips for every model) and stop on it; the held-out fold is only
predicted. With ``train.refit`` each fold's model is then fitted again on all its training rows (fit + stopping)
for the rounds/epochs the stopping run chose (per fold: ``best_iteration``/``best_epoch`` chosen,
``rounds``/``epochs`` used, ``refit``, ``n_model`` rows). ``train_metrics.json`` keeps the two apart:
``stopping_log_loss`` (mean over folds of the loss at the stopping point, on the rows it was chosen on: optimistic)
and ``oof_log_loss`` (the held-out folds: unbiased).
XGBoost trains first (it needs the whole cluster's collective), then the head's folds run in parallel as Dask
tasks that stream their data from Parquet themselves.

Several backbones (``embed.backbones``): XGBoost trains once, on the whole feature table (every backbone's pooled
columns); ``head`` in ``train.models`` trains one head per backbone (:func:`model_names`): ``head`` on the main
backbone's frame embeddings, ``head_<backbone>`` on each other one's, each with the same metadata columns
(container + pixel statistics, :data:`jungletrap.head_stream.META_FEATURES`; no pooled columns, so a head never
sees another backbone). Their folds are submitted together and run in parallel; the ensemble blends them all.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, Future

from jungletrap.catalog import CATALOG_NAME
from jungletrap.cluster import gpu_resources
from jungletrap.config import JobConfig
from jungletrap.features import FEATURES_DIR
from jungletrap.metrics import mean_log_loss
from jungletrap.schema import CLASS_NAMES, FOLD, SPLIT, SPLIT_TRAIN, VIDEO_ID
from jungletrap.storage import RunPath, path_token, read_parquet, write_json_atomic, write_parquet_atomic
from jungletrap.train_head import train_head_fold
from jungletrap.xgb import load_feature_matrix, train_xgb_folds

__all__ = ["run_train", "embed_dir", "embed_dirs", "head_backbones", "model_names", "prediction_path",
           "read_predictions"]

log = logging.getLogger(__name__)


def embed_dir(cfg: JobConfig, run_dir: RunPath, backbone: str | None = None) -> RunPath:
    """``embeddings/<backbone>/`` of a run: the main backbone's unless ``backbone`` is named."""
    return run_dir / "embeddings" / (backbone or cfg.embed.backbone_names[0])


def embed_dirs(cfg: JobConfig, run_dir: RunPath) -> dict[str, RunPath]:
    """Every backbone's embedding dataset of a run, the main backbone first."""
    return {name: embed_dir(cfg, run_dir, name) for name in cfg.embed.backbone_names}


HEAD = "head"


def head_model_name(backbone: str, main: str) -> str:
    """``head`` for the main backbone's head, ``head_<backbone>`` for another's."""
    return HEAD if backbone == main else f"{HEAD}_{backbone}"


def head_backbones(cfg: JobConfig) -> dict[str, str]:
    """Model name → backbone of every head the run trains (none unless ``head`` is in ``train.models``)."""
    names = cfg.embed.backbone_names
    return {head_model_name(b, names[0]): b for b in names} if HEAD in cfg.train.models else {}


def model_names(cfg: JobConfig) -> list[str]:
    """Every model the train stage writes predictions for, in ``train.models`` order, a head per backbone."""
    heads = list(head_backbones(cfg))
    return [name for m in cfg.train.models for name in (heads if m == HEAD else [m])]


def prediction_path(run_dir: RunPath, kind: str, model: str) -> RunPath:
    """``oof/<model>.parquet`` or ``test/<model>.parquet``."""
    return run_dir / kind / f"{model}.parquet"


def read_predictions(path: RunPath) -> pd.DataFrame:
    return read_parquet(path).set_index(VIDEO_ID)


def _write_predictions(frame: pd.DataFrame, path: RunPath) -> None:
    import pyarrow as pa

    frame = frame[[VIDEO_ID, *CLASS_NAMES]].sort_values(VIDEO_ID).reset_index(drop=True)
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), path)


def _oof_score(oof: pd.DataFrame, catalog: pd.DataFrame) -> float:
    truth = catalog.set_index(VIDEO_ID).loc[oof[VIDEO_ID], list(CLASS_NAMES)].to_numpy()
    return mean_log_loss(truth, oof[list(CLASS_NAMES)].to_numpy())


def _train_xgb(client: Client, cfg: JobConfig, run_dir: RunPath, catalog: pd.DataFrame, gpu: bool) -> dict[str, Any]:
    matrix = load_feature_matrix(client, run_dir / FEATURES_DIR)
    rows = catalog.set_index(VIDEO_ID).loc[matrix.video_ids]
    return train_xgb_folds(client, matrix, rows[list(CLASS_NAMES)].to_numpy(np.float32), rows[SPLIT].to_numpy(),
                           rows[FOLD].to_numpy(), cfg.train.xgb, seed=cfg.run.seed, gpu=gpu,
                           models_dir=run_dir / "models" / "xgb",
                           stopping_fraction=cfg.train.early_stopping_fraction, refit=cfg.train.refit,
                           refit_scale=cfg.train.refit_scale)


def _submit_head(client: Client, cfg: JobConfig, run_dir: RunPath, gpu: bool, model: str, backbone: str
                 ) -> list[Future]:
    """Submit one head's fold tasks (they run in parallel with every other head's)."""
    return [
        client.submit(
            train_head_fold,
            run_dir / CATALOG_NAME,
            embed_dir(cfg, run_dir, backbone),
            run_dir / FEATURES_DIR,
            run_dir / "models" / model,
            k,
            cfg.train.head,
            cfg.run.seed,
            "cuda" if gpu else "cpu",
            stopping_fraction=cfg.train.early_stopping_fraction,
            refit=cfg.train.refit,
            refit_scale=cfg.train.refit_scale,
            key=f"{model}-fold{k}-{path_token(run_dir)}",
            pure=False,
            resources=gpu_resources(gpu),
        )
        for k in range(cfg.catalog.n_folds)
    ]


def _head_result(client: Client, futures: list[Future]) -> dict[str, Any]:
    results = sorted(client.gather(futures), key=lambda r: r["fold"])
    for fut in futures:
        fut.release()
    test = pd.concat([r["test"].set_index(VIDEO_ID) for r in results])
    return {
        "oof": pd.concat([r["oof"] for r in results], ignore_index=True),
        "test": test.groupby(level=0).mean().reset_index(),
        "folds": [{k: r[k] for k in ("fold", "best_epoch", "stopping_logloss", "refit", "epochs", "oof_logloss",
                                     "n_fit", "n_stopping", "n_model", "curve")} for r in results],
    }


def run_train(client: Client, cfg: JobConfig, run_dir: RunPath, *, gpu: bool = False) -> dict[str, Any]:
    """Train every model of :func:`model_names`; return per-model OOF scores (fold details: ``train_metrics.json``).

    XGBoost trains alone (one ``xgboost.dask`` training at a time); then every head's folds are submitted at once.
    """
    catalog = read_parquet(run_dir / CATALOG_NAME)
    train_ids = set(catalog.loc[catalog[SPLIT] == SPLIT_TRAIN, VIDEO_ID])
    summary: dict[str, Any] = {}
    heads: dict[str, list[Future]] | None = None  # every head's fold tasks, submitted at the first head
    for model in model_names(cfg):
        log.info("train: %s over %d folds", model, cfg.catalog.n_folds)
        if model == "xgb":
            result = _train_xgb(client, cfg, run_dir, catalog, gpu)
        else:
            if heads is None:  # submit every head's folds at once, so they share the cluster
                heads = {m: _submit_head(client, cfg, run_dir, gpu, m, b) for m, b in head_backbones(cfg).items()}
            result = _head_result(client, heads.pop(model))
        oof = result["oof"]
        if sorted(oof[VIDEO_ID]) != sorted(train_ids):
            raise RuntimeError(f"{model}: out-of-fold predictions do not cover every training clip exactly once")
        _write_predictions(oof, prediction_path(run_dir, "oof", model))
        _write_predictions(result["test"], prediction_path(run_dir, "test", model))
        score = _oof_score(oof, catalog)
        stopping = float(np.mean([f["stopping_logloss"] for f in result["folds"]]))
        summary[model] = {"oof_log_loss": score, "stopping_log_loss": stopping, "folds": result["folds"]}
        log.info("train: %s out-of-fold log loss %.5f (early-stopping rows: %.5f)", model, score, stopping)
    write_json_atomic(summary, run_dir / "train_metrics.json")
    return {m: round(v["oof_log_loss"], 6) for m, v in summary.items()}

