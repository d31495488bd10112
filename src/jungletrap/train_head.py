"""Neural head over the folds: one Dask task per fold, each reading its inputs from the run's Parquet files.

The head (:mod:`jungletrap.head`) sees the T×D frame embeddings (masked where a clip has fewer frames) and a
metadata vector (container facts + pixel/motion statistics). The metadata scaler is fitted on the fold's
training rows only and saved beside the weights, so prediction applies exactly the same transform.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from jungletrap.catalog import fold_masks
from jungletrap.cluster import worker_nthreads
from jungletrap.config import HeadConfig
from jungletrap.embed import read_embedding_meta
from jungletrap.feature_fit import RELATIVE_FEATURES
from jungletrap.features import embedding_parts, read_embedding_part
from jungletrap.head import HeadData, build_head, fit_head, pad_frames, predict_head
from jungletrap.schema import (
    CLASS_NAMES,
    EMBEDDING,
    FOLD,
    PIXEL_COLUMNS,
    SPLIT,
    SPLIT_TEST,
    VIDEO_ID,
)
from jungletrap.storage import RunPath, read_parquet, run_path, write_bytes_atomic, write_text_atomic
from jungletrap.udfs.features import CONTAINER_FEATURES

__all__ = ["HeadInputs", "load_head_inputs", "MetaScaler", "train_head_fold", "predict_head_models", "META_FEATURES"]

log = logging.getLogger(__name__)

META_FEATURES: tuple[str, ...] = (*CONTAINER_FEATURES, *PIXEL_COLUMNS, *RELATIVE_FEATURES)
_LOG_COLUMNS = ("size_bytes", "bit_rate", "bytes_per_second", "bytes_per_pixel", "declared_frames",
                "decoded_frames", "width", "height", *RELATIVE_FEATURES)


@dataclass
class HeadInputs:
    """Every video's frame embeddings and raw metadata, aligned by row."""

    video_ids: np.ndarray
    embeddings: list[np.ndarray]  # (n_i, D) float32
    meta: pd.DataFrame  # raw META_FEATURES
    embed_dim: int


def load_head_inputs(embed_dir: RunPath, features_dir: RunPath) -> HeadInputs:
    """Read embeddings and the metadata columns of the feature table for every video."""
    parts = [read_embedding_part(p) for p in embedding_parts(embed_dir)]
    frame = pd.concat(parts, ignore_index=True)
    meta = read_parquet(features_dir, columns=[VIDEO_ID, *META_FEATURES]).set_index(VIDEO_ID)
    meta = meta.reindex(frame[VIDEO_ID].to_numpy())
    dim = int(read_embedding_meta(embedding_parts(embed_dir)[0])["feature_dim"])
    embeddings = [np.asarray(e, dtype=np.float32).reshape(-1, dim) for e in frame[EMBEDDING]]
    return HeadInputs(frame[VIDEO_ID].to_numpy(dtype=object), embeddings, meta.reset_index(drop=True), dim)


@dataclass
class MetaScaler:
    """log1p on size-like columns, then standardisation fitted on training rows; NaN becomes 0 (the mean)."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, meta: pd.DataFrame) -> MetaScaler:
        x = cls._log(meta)
        return cls(mean={c: float(np.nan_to_num(x[c].mean())) for c in x},
                   std={c: float(x[c].std()) if x[c].std() > 0 else 1.0 for c in x})

    @staticmethod
    def _log(meta: pd.DataFrame) -> pd.DataFrame:
        x = meta[list(META_FEATURES)].astype(np.float64).copy()
        for c in _LOG_COLUMNS:
            x[c] = np.log1p(x[c].clip(lower=0))
        return x

    def transform(self, meta: pd.DataFrame) -> np.ndarray:
        x = self._log(meta)
        z = (x - pd.Series(self.mean)) / pd.Series(self.std)
        return np.nan_to_num(z.to_numpy(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _data(inputs: HeadInputs, rows: np.ndarray, scaler: MetaScaler, cfg: HeadConfig,
          labels: np.ndarray | None) -> HeadData:
    frames, mask = pad_frames([inputs.embeddings[i] for i in rows], max_frames=cfg.max_frames, dim=inputs.embed_dim)
    meta = scaler.transform(inputs.meta.iloc[rows])
    return HeadData(frames=frames, mask=mask, meta=meta, labels=labels)


def _import_torch_dynamo() -> None:
    """Import ``torch._dynamo`` on a helper thread, once per process, before the fold builds its optimizer.

    ``torch.optim`` imports it lazily on the first optimizer (``torch._compile``), a chain of nested imports
    (sympy among them) about 100 frames deep. Run in the task's thread, Dask's statistical profiler records
    that stack, and a worker profile nested that deep makes ``dask.sizeof`` hit RecursionError (dask/distributed
    #8578): the stage's performance report then logs "Sizeof calculation for object of type 'dict' failed" once
    per worker. The profiler does not sample helper threads; the import's time still shows, under this function.
    """
    if "torch._dynamo" in sys.modules:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jungletrap-import") as pool:
        pool.submit(importlib.import_module, "torch._dynamo").result()


def train_head_fold(
    catalog_path: RunPath | str,
    embed_dir: RunPath | str,
    features_dir: RunPath | str,
    models_dir: RunPath | str,
    fold: int,
    cfg: HeadConfig,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Dask task: fit the head on the other folds, predict the held-out fold and the test clips, save weights."""
    _import_torch_dynamo()
    torch.set_num_threads(max(cfg.torch_threads, worker_nthreads()))
    inputs = load_head_inputs(run_path(embed_dir), run_path(features_dir))
    catalog = read_parquet(catalog_path, columns=[VIDEO_ID, SPLIT, FOLD, *CLASS_NAMES]).set_index(VIDEO_ID)
    catalog = catalog.reindex(inputs.video_ids)
    fit_mask, valid_mask = fold_masks(catalog[SPLIT].to_numpy(), catalog[FOLD].to_numpy(), fold)
    fit_rows, valid_rows = np.flatnonzero(fit_mask), np.flatnonzero(valid_mask)
    test_rows = np.flatnonzero((catalog[SPLIT] == SPLIT_TEST).to_numpy())
    y = catalog[list(CLASS_NAMES)].to_numpy(np.float32)
    scaler = MetaScaler.fit(inputs.meta.iloc[fit_rows])
    train_data = _data(inputs, fit_rows, scaler, cfg, y[fit_rows])
    valid_data = _data(inputs, valid_rows, scaler, cfg, y[valid_rows])
    result = fit_head(train_data, valid_data, cfg=cfg, seed=seed + fold, class_prior=y[fit_rows].mean(axis=0),
                      device=device)
    model = build_head(result.init_kwargs, result.state_dict)
    out_dir = run_path(models_dir)
    weights = io.BytesIO()
    torch.save(result.state_dict, weights)
    write_bytes_atomic(weights.getvalue(), out_dir / f"fold{fold}.pt")
    write_text_atomic(json.dumps(
        {"init_kwargs": result.init_kwargs, "scaler": {"mean": scaler.mean, "std": scaler.std},
         "max_frames": cfg.max_frames}, indent=2), out_dir / f"fold{fold}.json")
    test_data = _data(inputs, test_rows, scaler, cfg, None)
    return {
        "fold": fold,
        "oof": _frame(inputs.video_ids[valid_rows], predict_head(model, valid_data)),
        "test": _frame(inputs.video_ids[test_rows], predict_head(model, test_data)),
        "best_epoch": result.best_epoch,
        "valid_logloss": result.best_valid_loss,
        "curve": result.curve,
    }


def _frame(video_ids: np.ndarray, proba: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(proba, columns=list(CLASS_NAMES))
    out.insert(0, VIDEO_ID, video_ids)
    return out


def predict_head_models(models_dir: RunPath, inputs: HeadInputs) -> np.ndarray:
    """Average the fold heads' probabilities for ``inputs`` (the predict path)."""
    probas = []
    for spec_path in sorted(models_dir.glob("fold*.json")):
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        state = torch.load(io.BytesIO(spec_path.with_suffix(".pt").read_bytes()), map_location="cpu",
                           weights_only=True)
        model = build_head(spec["init_kwargs"], state)
        scaler = MetaScaler(mean=spec["scaler"]["mean"], std=spec["scaler"]["std"])
        frames, mask = pad_frames(inputs.embeddings, max_frames=spec["max_frames"], dim=inputs.embed_dim)
        data = HeadData(frames=frames, mask=mask, meta=scaler.transform(inputs.meta), labels=None)
        probas.append(predict_head(model, data))
    if not probas:
        raise FileNotFoundError(f"no head models in {models_dir}")
    return np.mean(probas, axis=0)
