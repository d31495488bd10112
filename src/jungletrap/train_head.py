"""Neural head over the folds: one Dask task per fold, each streaming its rows from the run's Parquet parts.

The head (:mod:`jungletrap.head`) sees the T×D frame embeddings (masked where a clip has fewer frames) and a
metadata vector (container facts + pixel/motion statistics). A fold fits on the training folds minus an inner
early-stopping split (:mod:`jungletrap.stopping`), stops on that split, and only predicts its held-out fold and
the test clips, so its out-of-fold score is not flattered by its stopping point; with ``train.refit`` a second head
then fits on all the fold's training rows for the chosen epoch count and replaces the first. The metadata scaler
is fitted on the rows the saved model fits on and saved beside the weights, so prediction applies the same
transform.

Rows are never held whole: every pass (a training epoch, the stopping loss, the held-out and test predictions,
``predict``) streams the parts through :class:`jungletrap.head_stream.ClipStream`; see its module for the bound.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch

from jungletrap.catalog import fold_masks
from jungletrap.cluster import worker_nthreads
from jungletrap.config import HeadConfig
from jungletrap.head import build_head, fit_head, predict_head
from jungletrap.head_stream import META_FEATURES, ClipStream, MetaScaler, PartIndex, fit_meta_scaler
from jungletrap.metrics import mean_log_loss
from jungletrap.schema import CLASS_NAMES, FOLD, SPLIT, SPLIT_TEST, VIDEO_ID
from jungletrap.stopping import refit_count, stopping_mask
from jungletrap.storage import RunPath, read_parquet, run_path, write_bytes_atomic, write_text_atomic

__all__ = ["META_FEATURES", "MetaScaler", "predict_head_models", "train_head_fold"]

log = logging.getLogger(__name__)


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


def _fold_rows(catalog: pd.DataFrame, fold: int, *, fraction: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks over the catalog's rows: fit, early-stopping, held-out (the fold) and test."""
    split, y = catalog[SPLIT].to_numpy(), catalog[list(CLASS_NAMES)].to_numpy(np.float32)
    train, held = fold_masks(split, catalog[FOLD].to_numpy(), fold)
    stop = stopping_mask(catalog[VIDEO_ID].to_numpy(), y, train, fraction=fraction, seed=seed + fold)
    return train & ~stop, stop, held, split == SPLIT_TEST


def _save(result: Any, scaler: MetaScaler, cfg: HeadConfig, out_dir: RunPath, fold: int) -> None:
    weights = io.BytesIO()
    torch.save(result.state_dict, weights)
    write_bytes_atomic(weights.getvalue(), out_dir / f"fold{fold}.pt")
    write_text_atomic(json.dumps(
        {"init_kwargs": result.init_kwargs, "scaler": {"mean": scaler.mean, "std": scaler.std},
         "max_frames": cfg.max_frames}, indent=2), out_dir / f"fold{fold}.json")


def train_head_fold(
    catalog_path: RunPath | str,
    embed_dir: RunPath | str,
    features_dir: RunPath | str,
    models_dir: RunPath | str,
    fold: int,
    cfg: HeadConfig,
    seed: int,
    device: str = "cpu",
    *,
    stopping_fraction: float = 0.125,
    refit: bool = False,
    refit_scale: bool = False,
) -> dict[str, Any]:
    """Dask task: fit the head on the other folds (minus the stopping rows), predict the held-out fold and the test.

    With ``refit`` the stopping run only chooses the epoch count: a second head (and metadata scaler) then fits on
    every training-fold row (fit + stopping) for that many epochs (:func:`jungletrap.stopping.refit_count`) and is
    the one saved and used; the held-out fold is still only predicted.

    Peak memory does not depend on the number of clips N except through per-clip bookkeeping (ids, split, fold,
    labels and metadata columns: ~400 bytes a clip, ~80 MB at 200,000 clips). The embeddings are streamed: one
    embed part's row group at a time + ``cfg.shuffle_buffer`` clips x ``cfg.max_frames`` x D float16 + one float32
    batch (1024 x 45 x 1280 x 2 bytes = 118 MB for the buffer at the defaults with a 1280-d backbone); the model
    and optimizer are independent of N, and the refit streams the same way. Folds run as parallel Dask tasks (one
    GPU each when present).
    """
    _import_torch_dynamo()
    torch.set_num_threads(max(cfg.torch_threads, worker_nthreads()))
    catalog = read_parquet(catalog_path, columns=[VIDEO_ID, SPLIT, FOLD, *CLASS_NAMES])
    index = PartIndex.open(run_path(embed_dir), run_path(features_dir))
    fit, stop, held, test = _fold_rows(catalog, fold, fraction=stopping_fraction, seed=seed)
    ids, y = catalog[VIDEO_ID].to_numpy(dtype=object), catalog[list(CLASS_NAMES)].to_numpy(np.float32)

    def stream(rows: np.ndarray, scaler: MetaScaler, labelled: bool = True) -> ClipStream:
        return ClipStream(index, ids[rows], labels=y[rows] if labelled else None, scaler=scaler,
                          max_frames=cfg.max_frames, shuffle_buffer=cfg.shuffle_buffer)

    scaler = fit_meta_scaler(index, ids[fit])
    result = fit_head(stream(fit, scaler), stream(stop, scaler), cfg=cfg, seed=seed + fold,
                      class_prior=y[fit].mean(axis=0), device=device)
    chosen, stopping_loss, curve = result.best_epoch, result.best_valid_loss, result.curve
    if refit:
        train = fit | stop
        scaler = fit_meta_scaler(index, ids[train])
        result = fit_head(stream(train, scaler), None, cfg=cfg, seed=seed + fold, class_prior=y[train].mean(axis=0),
                          device=device, epochs=refit_count(chosen, fraction=stopping_fraction, scale=refit_scale))
    _save(result, scaler, cfg, run_path(models_dir), fold)
    model = build_head(result.init_kwargs, result.state_dict).to(device)
    held_out, test_clips = stream(held, scaler), stream(test, scaler, labelled=False)
    oof = predict_head(model, held_out)
    assert held_out.labels is not None
    return {
        "fold": fold,
        "oof": _frame(held_out.video_ids, oof),
        "test": _frame(test_clips.video_ids, predict_head(model, test_clips)),
        "best_epoch": chosen,
        "stopping_logloss": stopping_loss,
        "refit": refit,
        "epochs": result.best_epoch,
        "oof_logloss": mean_log_loss(held_out.labels, oof),
        "n_fit": int(fit.sum()),
        "n_stopping": int(stop.sum()),
        "n_model": int((fit | stop).sum() if refit else fit.sum()),
        "curve": curve,
    }


def _frame(video_ids: np.ndarray, proba: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(proba, columns=list(CLASS_NAMES))
    out.insert(0, VIDEO_ID, video_ids)
    return out


def predict_head_models(models_dir: RunPath, embed_dir: RunPath, features_dir: RunPath) -> pd.DataFrame:
    """Average the fold heads' probabilities over every clip of a run's parts, streamed (the predict path).

    Memory as for a fold task without the shuffle buffer: one part and one batch at a time, per model.
    """
    index = PartIndex.open(embed_dir, features_dir)
    ids = np.concatenate([p.video_ids for p in index.parts])
    total: np.ndarray | None = None
    specs = sorted(models_dir.glob("fold*.json"))
    for spec_path in specs:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        state = torch.load(io.BytesIO(spec_path.with_suffix(".pt").read_bytes()), map_location="cpu",
                           weights_only=True)
        scaler = MetaScaler(mean=spec["scaler"]["mean"], std=spec["scaler"]["std"])
        stream = ClipStream(index, ids, scaler=scaler, max_frames=spec["max_frames"])
        proba = predict_head(build_head(spec["init_kwargs"], state), stream)
        total = proba if total is None else total + proba
    if total is None:
        raise FileNotFoundError(f"no head models in {models_dir}")
    return pd.DataFrame(total / len(specs), index=pd.Index(ids, name=VIDEO_ID), columns=list(CLASS_NAMES))
