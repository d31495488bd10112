"""Distributed XGBoost over the folds: ``xgboost.dask`` on the feature table, one multi-label model per fold.

The label is the 24-column 0/1 matrix (XGBoost's multi-label mode, ``binary:logistic`` per output), so one
booster per fold serves every class. Early stopping watches an inner split of the fold's training rows (never
the held-out fold, whose score it would flatter); with ``train.refit`` a second booster then fits on all the
fold's training rows for the chosen rounds and is the fold's model. Out-of-fold predictions cover every training
clip exactly once and test predictions average the fold models. No class
reweighting: the metric is log loss, where calibrated probabilities matter more than recall.
Training runs one model at a time (two concurrent ``xgboost.dask`` trainings can deadlock its collective).

Where a fold trains: ``xgboost.dask`` builds every tree node's gradient histogram on each worker from its own
rows and then allreduces the whole histogram (features x ``max_bin`` x 16 bytes, whatever the rows), and every
worker evaluates the same splits. That exchange pays off only when each worker has enough rows to build; a fold
therefore trains on as many workers as hold ``min_rows_per_worker`` of its rows each, and on one worker below
that (``bench/xgb.py`` measures both; see README, Training). Trainings run one at a time, so the threads of
the fold's hosts' other workers are idle meanwhile: the fold's workers use them (``fold_threads``).
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import xgboost as xgb
import xgboost.dask  # noqa: F401  (the dask module must be imported explicitly)
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from distributed import Client, Future, futures_of

from jungletrap.catalog import fold_masks
from jungletrap.cluster import relax_malloc_trim, worker_nthreads
from jungletrap.config import XGBConfig
from jungletrap.metrics import mean_log_loss
from jungletrap.schema import CLASS_NAMES, ERROR, SPLIT_TEST, SPLIT_TRAIN, STATUS, VIDEO_ID
from jungletrap.stopping import refit_count, stopping_mask
from jungletrap.storage import RunPath, is_remote, read_schema, read_table, write_bytes_atomic, write_json_atomic
from jungletrap.tasks import results_as_completed

XGBResult = dict[str, Any]

__all__ = [
    "FeatureMatrix",
    "fold_threads",
    "block_placement",
    "fold_workers",
    "futures_array",
    "kept_blocks",
    "live_workers",
    "place_rows",
    "load_feature_matrix",
    "predict_xgb_models",
    "spread",
    "take_rows",
    "train_xgb_folds",
    "xgb_params",
]

log = logging.getLogger(__name__)

_NON_FEATURES = {VIDEO_ID, STATUS, ERROR}


@dataclass
class FeatureMatrix:
    """The feature table as a Dask array (one chunk per Parquet part) plus the row ids, held on the client.

    Building arrays straight from the part files (instead of selecting thousands of columns of a Dask
    DataFrame per fold) keeps graph construction negligible; fold subsets are numpy masks over the rows.
    """

    X: da.Array
    video_ids: np.ndarray
    features: list[str]
    block_workers: list[str] | None = None  # the worker each block of X was persisted on (a placement hint)
    block_futures: list[Future] | None = None  # each block's future (a fold's rows are taken from them directly)


def _read_part_matrix(path: RunPath | str, features: list[str]) -> np.ndarray:
    return read_table(path, columns=features).to_pandas().to_numpy(np.float32)


def load_feature_matrix(client: Client, features_dir: RunPath, *, features: list[str] | None = None) -> FeatureMatrix:
    """Persist the numeric features on the workers; ``features`` fixes the column order (predict)."""
    parts = sorted(features_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no feature parts in {features_dir}: run the features stage first")
    if features is None:
        schema = read_schema(parts[0])
        features = [f.name for f in schema if f.name not in _NON_FEATURES and pa.types.is_floating(f.type)]
    ids = [read_table(p, columns=[VIDEO_ID]).column(0).to_pylist() for p in parts]
    blocks = [da.from_delayed(dask.delayed(_read_part_matrix)(p, features), shape=(len(i), len(features)),
                              dtype=np.float32) for p, i in zip(parts, ids, strict=True) if i]
    workers = live_workers(client)
    # Spread the parts over the workers round-robin: every worker gets rows to train on.
    placed = [workers[i % len(workers)] for i in range(len(blocks))]
    persisted = [client.persist(b, workers=[w]) for b, w in zip(blocks, placed, strict=True)]
    futures = [futures_of(b)[0] for b in persisted]
    X = futures_array(futures, [b.shape[0] for b in blocks], len(features), np.float32)
    return FeatureMatrix(X=X, video_ids=np.array([v for i in ids for v in i], dtype=object), features=features,
                         block_workers=placed, block_futures=futures)


def futures_array(futures: list[Future], rows: list[int], n_cols: int, dtype: Any) -> da.Array:
    """An array over blocks already in memory, as one graph layer (as ``persist`` leaves it).

    ``da.concatenate`` of hundreds of persisted blocks makes a graph of as many layers, and every later
    ``.blocks[i]``, persist or ``xgboost.dask`` matrix over it costs time in that count: quadratic in the
    blocks (a 782-part, 200,000-clip fold spent 5 minutes building one matrix in the scheduler).
    """
    name = futures[0].key[0] if futures and isinstance(futures[0].key, tuple) else None
    if name is None or any(f.key != (name, i, 0) for i, f in enumerate(futures)):
        name = f"blocks-{tokenize(*(f.key for f in futures))}"
    layer = {(name, i, 0): f for i, f in enumerate(futures)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=())
    return da.Array(graph, name, chunks=(tuple(rows), (n_cols,)), dtype=dtype)


def xgb_params(cfg: XGBConfig, *, seed: int, gpu: bool) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "multi_strategy": cfg.multi_strategy,
        "learning_rate": cfg.learning_rate,
        "max_depth": cfg.max_depth,
        "min_child_weight": cfg.min_child_weight,
        "subsample": cfg.subsample,
        "colsample_bytree": cfg.colsample_bytree,
        "reg_lambda": cfg.reg_lambda,
        "max_bin": cfg.max_bin,
        "seed": seed,
        "device": "cuda" if gpu else "cpu",
    }


def _frame(video_ids: np.ndarray, proba: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(np.asarray(proba, dtype=np.float64).reshape(len(video_ids), len(CLASS_NAMES)),
                       columns=list(CLASS_NAMES))
    out.insert(0, VIDEO_ID, video_ids)
    return out


def prior_margin(labels: np.ndarray) -> np.ndarray:
    """Per-class logit of the training rows' class rates: the boosters start from calibrated priors.

    XGBoost's own intercept is one number for all 24 outputs; with rare classes and early stopping that
    leaves common and rare classes badly calibrated, which log loss punishes.
    """
    rate = np.clip(labels.mean(axis=0), 1e-4, 1 - 1e-4)
    return np.log(rate / (1 - rate)).astype(np.float32)


def take_rows(X: da.Array, mask: np.ndarray) -> da.Array:
    """Rows of ``X`` under a boolean mask, leaving out chunks that would be empty.

    ``xgboost.dask`` trains on the workers that hold partitions; a worker holding only empty ones cannot infer
    the 24 outputs and the multi-target model fails (``base_score`` length mismatch), so none are passed.
    """
    blocks, start = [], 0
    for i, n in enumerate(X.chunks[0]):
        part = mask[start : start + n]
        start += n
        if part.all():
            blocks.append(X.blocks[i])
        elif part.any():
            blocks.append(X.blocks[i][part])
    return da.concatenate(blocks) if blocks else X[:0]


#: How long a fold waits for a worker when none is connected (all lost or restarting) before it fails.
WAIT_FOR_A_WORKER_S = 120.0


def live_workers(client: Client) -> list[str]:
    """The connected workers, sorted; when none is (all lost, or restarted by their nannies after the previous
    stage), wait up to ``WAIT_FOR_A_WORKER_S`` for one rather than fail on an empty list."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        client.wait_for_workers(1, timeout=WAIT_FOR_A_WORKER_S)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    return workers


def fold_workers(client: Client, n_rows: int, cfg: XGBConfig) -> list[str]:
    """The workers a fold trains on: as many as get ``cfg.min_rows_per_worker`` of its ``n_rows`` each, at least one.

    Asked per fold, so a fold after a lost worker is placed on the workers alive then (its ``DaskDMatrix`` es are
    built from that placement).
    """
    workers = live_workers(client)
    return workers[: max(1, min(len(workers), n_rows // cfg.min_rows_per_worker))]


def fold_threads(client: Client, workers: list[str]) -> int:
    """Threads per training worker: all threads of the workers on its host, shared by the fold's workers there.

    On the default 2 x 1-thread ``LocalCluster`` a fold on one worker trains with 2 threads (the other worker's
    thread would sit idle), a fold on both with 1 each, as on any cluster with one worker per machine.
    """
    info = client.scheduler_info(n_workers=-1)["workers"]
    # A worker gone since the fold was placed (lost, or retired by its nanny) is not counted here: xgboost.dask
    # reports a fold whose data it cannot reach, and a nanny's replacement is already in ``info``.
    training = Counter(info[w]["host"] for w in workers if w in info)
    threads = Counter[str]()
    for w in info.values():
        threads[w["host"]] += int(w["nthreads"])
    return max(1, min((threads[host] // n for host, n in training.items()), default=1))


def kept_blocks(X: da.Array, mask: np.ndarray) -> list[int]:
    """Indices of ``X``'s blocks that keep at least one row under ``mask`` (the blocks :func:`take_rows` keeps)."""
    bounds = np.cumsum((0, *X.chunks[0]))
    return [i for i in range(X.numblocks[0]) if mask[bounds[i] : bounds[i + 1]].any()]


def block_placement(hints: list[str | None], workers: list[str]) -> list[str]:
    """The fold worker each block trains on: where it already lies when that is a fold worker, else the least loaded.

    Rows then move between workers only when the fold trains on fewer workers than hold its rows. Every fold
    worker gets at least one block (the caller has at least as many blocks as workers): ``xgboost.dask``
    trains on the workers holding blocks, and each needs some of both matrices.
    """
    load = dict.fromkeys(workers, 0)
    placed: list[str] = []
    for hint in hints:
        target = hint if hint in load else min(load, key=lambda w: (load[w], w))
        load[target] += 1
        placed.append(target)
    for idle in [w for w, n in load.items() if n == 0]:  # give an idle worker a block of the busiest one
        busiest = max(load, key=lambda w: (load[w], w))
        i = max(i for i, w in enumerate(placed) if w == busiest)
        placed[i], load[busiest], load[idle] = idle, load[busiest] - 1, 1
    return placed


def spread(client: Client, X: da.Array, workers: list[str], hints: list[str | None] | None = None) -> da.Array:
    """Persist ``X``'s blocks on the fold's workers, each worker holding at least one block.

    ``xgboost.dask`` trains on every worker that holds a partition of the training *or* evaluation data; a
    worker holding evaluation rows but no training rows cannot infer the 24 outputs and the multi-target model
    fails. Blocks stay where ``hints`` say they already are when that worker trains the fold (no copy, no
    concatenation: ``DaskQuantileDMatrix`` reads a worker's blocks one by one); only with fewer blocks than
    workers are the rows cut into one block per worker. X, labels and margins get the same placement.
    """
    n = max(1, min(len(workers), X.shape[0]))
    if X.numblocks[0] < n or hints is None or len(hints) != X.numblocks[0]:
        X = X.rechunk({0: -(-X.shape[0] // n) if X.shape[0] else -1})
        hints = [None] * X.numblocks[0]
    placed = block_placement(hints, workers[:n])
    # A task of its own per block and target worker: persist leaves a key that is already in memory where it is,
    # whatever the restriction, so neither an alias of an input block (culled to that key) nor a block an
    # earlier placement put elsewhere (same data, same token) may share its key with this placement's block.
    return da.concatenate([client.persist(X.blocks[i].map_blocks(_same, dtype=X.dtype,
                                                                 name=f"spread-{tokenize(X.blocks[i].name, w)}"),
                                          workers=[w])
                           for i, w in enumerate(placed)])


def _same(block: np.ndarray) -> np.ndarray:
    return block


def _rows(block: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return block if rows is None else block[rows]


def place_rows(client: Client, matrix: FeatureMatrix, Y: da.Array, mask: np.ndarray, kept: list[int],
               workers: list[str], margin: np.ndarray) -> tuple[da.Array, da.Array, da.Array]:
    """A fold's rows, labels and margins, one task per kept block on the worker :func:`block_placement` picks.

    Tasks are submitted on the blocks' futures (no graph over the whole matrix: linear in the blocks); a block
    whose rows all stay is passed through (no copy on the worker that holds it). Keys name the rows and the
    worker, so no earlier placement of the same rows elsewhere is taken for this one (see :func:`spread`).
    """
    if matrix.block_futures is None or matrix.block_workers is None:
        raise ValueError("place_rows needs a matrix from load_feature_matrix (its blocks' futures and workers)")
    bounds = np.cumsum((0, *matrix.X.chunks[0]))
    targets = block_placement([matrix.block_workers[i] for i in kept], workers)
    token = tokenize(matrix.X.name, mask, margin, targets)
    names = {part: f"fold-{part}-{token}" for part in ("x", "y", "m")}
    labels = Y.blocks  # only the kept blocks' labels are computed, on the client (N x 24 at most)
    x_futs, y_futs, m_futs, rows = [], [], [], []
    for j, (i, w) in enumerate(zip(kept, targets, strict=True)):
        part = mask[bounds[i] : bounds[i + 1]]
        sel = None if part.all() else np.flatnonzero(part)
        x = client.submit(_rows, matrix.block_futures[i], sel, key=(names["x"], j, 0), workers=[w])
        y = np.asarray(labels[i].compute(scheduler="sync"))
        y_futs.append(client.submit(_rows, y, sel, key=(names["y"], j, 0), workers=[w]))
        m_futs.append(client.submit(_margin_block, x, margin, key=(names["m"], j, 0), workers=[w]))
        x_futs.append(x)
        rows.append(int(part.sum()))
    return (futures_array(x_futs, rows, matrix.X.shape[1], matrix.X.dtype),
            futures_array(y_futs, rows, Y.shape[1], Y.dtype),
            futures_array(m_futs, rows, len(margin), np.float32))


def _margin_block(block: np.ndarray, margin: np.ndarray) -> np.ndarray:
    return np.broadcast_to(margin, (block.shape[0], len(margin))).astype(np.float32)


def _margin(X: da.Array, margin: np.ndarray) -> da.Array:
    """The per-class prior margin for every row of ``X``, made on the workers beside ``X``'s blocks."""
    return da.map_blocks(_margin_block, X, margin, chunks=(X.chunks[0], (len(margin),)), dtype=np.float32)


def _predict(client: Client, booster: xgb.Booster | Future, X: da.Array, margin: np.ndarray,
             n_rounds: int) -> da.Array:
    """Lazy probabilities of ``booster``'s first ``n_rounds`` rounds over ``X`` (compute several in one call)."""
    if X.shape[0] == 0:
        return da.zeros((0, len(CLASS_NAMES)), chunks=((0,), (len(CLASS_NAMES),)))
    return xgb.dask.inplace_predict(client, booster, X, iteration_range=(0, n_rounds), base_margin=_margin(X, margin))


def _fold_data(client: Client, matrix: FeatureMatrix, Y: da.Array, fit: np.ndarray, stop: np.ndarray | None,
               margin: np.ndarray, cfg: XGBConfig) -> tuple[Any, Any, list[str]]:
    """The fold's fit and early-stopping matrices, each with a block on every one of the fold's workers.

    ``DaskQuantileDMatrix``: each worker quantises its blocks straight into the histogram index (1 byte per
    value), with no float copy of its rows (``DaskDMatrix`` concatenated them and kept a float32 copy besides);
    the stopping matrix shares the fit matrix's cuts (``ref``). The fold trains on no more workers than there
    are stopping rows, so no training worker lacks either matrix. ``stop`` None (the refit) gives the fit
    matrix alone, over as many workers as its rows call for.
    """
    n_stop = len(fit) if stop is None else max(1, int(stop.sum()))
    workers = fold_workers(client, int(fit.sum()), cfg)[:n_stop]

    def placed(mask: np.ndarray) -> tuple[da.Array, da.Array, da.Array]:
        kept = kept_blocks(matrix.X, mask)
        if matrix.block_futures is not None and matrix.block_workers is not None and len(kept) >= len(workers):
            return place_rows(client, matrix, Y, mask, kept, workers, margin)
        hints = [matrix.block_workers[i] for i in kept] if matrix.block_workers is not None else None
        x, y = (spread(client, take_rows(a, mask), workers, hints) for a in (matrix.X, Y))
        return x, y, spread(client, _margin(x, margin), workers, hints)

    x_fit, y_fit, m_fit = placed(fit)
    dfit = xgb.dask.DaskQuantileDMatrix(client, x_fit, y_fit, base_margin=m_fit, max_bin=cfg.max_bin)
    if stop is None:
        return dfit, None, workers
    x_stop, y_stop, m_stop = placed(stop)
    dstop = xgb.dask.DaskQuantileDMatrix(client, x_stop, y_stop, base_margin=m_stop, max_bin=cfg.max_bin, ref=dfit)
    return dfit, dstop, workers


@dataclass
class _FoldModel:
    """The booster a fold predicts with: its prior margin and the rounds it uses."""

    booster: xgb.Booster
    margin: np.ndarray
    rounds: int


def _stopping_run(client: Client, matrix: FeatureMatrix, Y: da.Array, labels: np.ndarray, fit: np.ndarray,
                  stop: np.ndarray, cfg: XGBConfig, params: dict[str, Any]) -> tuple[_FoldModel, list[float]]:
    """Fit on ``fit``, stop early on ``stop``; the best round count and the stopping curve."""
    margin = prior_margin(labels[fit])
    dtrain, dstop, workers = _fold_data(client, matrix, Y, fit, stop, margin, cfg)
    out = xgb.dask.train(client, {**params, "nthread": fold_threads(client, workers)}, dtrain,
                         num_boost_round=cfg.n_estimators, evals=[(dstop, "stopping")],
                         early_stopping_rounds=cfg.early_stopping_rounds, verbose_eval=False)
    booster: xgb.Booster = out["booster"]
    curve = [float(v) for v in out["history"]["stopping"]["logloss"]]
    return _FoldModel(booster, margin, int(booster.best_iteration) + 1), curve


def _refit(client: Client, matrix: FeatureMatrix, Y: da.Array, labels: np.ndarray, train: np.ndarray,
           rounds: int, cfg: XGBConfig, params: dict[str, Any]) -> _FoldModel:
    """Fit on every training-fold row (fit + stopping) for exactly ``rounds`` rounds, nothing to stop on."""
    margin = prior_margin(labels[train])
    dtrain, _, workers = _fold_data(client, matrix, Y, train, None, margin, cfg)
    out = xgb.dask.train(client, {**params, "nthread": fold_threads(client, workers)}, dtrain,
                         num_boost_round=rounds, verbose_eval=False)
    return _FoldModel(out["booster"], margin, rounds)


def train_xgb_folds(
    client: Client,
    matrix: FeatureMatrix,
    labels: np.ndarray,
    split: np.ndarray,
    folds: np.ndarray,
    cfg: XGBConfig,
    *,
    seed: int,
    gpu: bool,
    models_dir: RunPath,
    stopping_fraction: float = 0.125,
    refit: bool = False,
    refit_scale: bool = False,
) -> XGBResult:
    """Train one booster per fold; return OOF and averaged test predictions, per-fold scores and curves.

    A fold's booster fits on the training folds minus the inner stopping split (:mod:`jungletrap.stopping`,
    ``stopping_fraction`` of them) and stops early on that split; with ``refit`` a second booster then fits on all
    the training folds' rows for the chosen rounds (:func:`jungletrap.stopping.refit_count`) and replaces it. The
    held-out fold is only predicted. The two trainings run one after the other, never at once.
    """
    if not is_remote(models_dir):
        models_dir.mkdir(parents=True, exist_ok=True)
    is_train, is_test = split == SPLIT_TRAIN, split == SPLIT_TEST
    Y = da.from_array(labels.astype(np.float32), chunks=(matrix.X.chunks[0], labels.shape[1]))
    x_test = take_rows(matrix.X, is_test)
    # Dask's nanny pins glibc's mmap threshold low: every histogram buffer would be a fresh mmap (~10 % slower).
    client.run(relax_malloc_trim)
    oof_parts, test_probas, folds_info = [], [], []
    for k in sorted(set(folds[is_train].tolist())):
        train, held = fold_masks(split, folds, k)
        stop = stopping_mask(matrix.video_ids, labels, train, fraction=stopping_fraction, seed=seed + k)
        fit = train & ~stop
        params = xgb_params(cfg, seed=seed + k, gpu=gpu)
        model, curve = _stopping_run(client, matrix, Y, labels, fit, stop, cfg, params)
        chosen = model.rounds
        if refit:
            model = _refit(client, matrix, Y, labels, train,
                           refit_count(chosen, fraction=stopping_fraction, scale=refit_scale), cfg, params)
        write_bytes_atomic(bytes(model.booster.save_raw("ubj")), models_dir / f"fold{k}.ubj")  # local path or URL
        on_workers = client.scatter(model.booster, hash=False)  # once for both predictions (no broadcast: can hang)
        oof_proba, test_proba = client.compute([_predict(client, on_workers, x, model.margin, model.rounds)
                                                for x in (take_rows(matrix.X, held), x_test)], sync=True)
        oof_parts.append(_frame(matrix.video_ids[held], oof_proba))
        test_probas.append(test_proba)
        folds_info.append({"fold": int(k), "best_iteration": chosen, "stopping_logloss": curve[chosen - 1],
                           "refit": refit, "rounds": model.rounds,
                           "oof_logloss": mean_log_loss(labels[held], np.asarray(oof_proba)),
                           "n_fit": int(fit.sum()), "n_stopping": int(stop.sum()),
                           "n_model": int((train if refit else fit).sum()), "stopping_curve": curve,
                           "margin": model.margin.tolist()})
        log.info("xgb fold %d: %d rounds chosen (stopping logloss %.4f), %s %d rounds, held-out fold %.4f", k,
                 chosen, curve[chosen - 1], "refit" if refit else "kept", model.rounds, folds_info[-1]["oof_logloss"])
        # The fold's matrices sit in reference cycles (xgboost.dask's objects): without a collection their row
        # copies stay persisted on the workers fold after fold, several folds' rows at once.
        del model, on_workers
        gc.collect()
    write_json_atomic({"features": matrix.features,
                       "folds": [{k: f[k] for k in ("fold", "rounds", "margin")} for f in folds_info]},
                      models_dir / "features.json")
    test = _frame(matrix.video_ids[is_test], np.mean(test_probas, axis=0))
    return {"oof": pd.concat(oof_parts, ignore_index=True), "test": test, "folds": folds_info}


def predict_xgb_models(client: Client, models_dir: RunPath, features_dir: RunPath) -> pd.DataFrame:
    """Average the saved fold boosters' probabilities over a feature table (the predict path), part by part;
    indexed by ``video_id``, sorted.

    One task per feature part reads it, scores it with every fold's booster and returns its clips' probabilities:
    a worker holds one part and the boosters, never a share of the whole table (scoring through ``xgboost.dask``
    over the persisted matrix grew predict's worker peak by 26 % from 2,000 to 20,000 clips). The boosters go to
    each worker once and are loaded once per worker process.
    """
    spec = json.loads((models_dir / "features.json").read_text(encoding="utf-8"))
    parts = sorted(features_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no feature parts in {features_dir}: run the features stage first")
    folds = [((models_dir / f"fold{fold['fold']}.ubj").read_bytes(), np.asarray(fold["margin"], np.float32),
              int(fold.get("rounds", fold.get("best_iteration"))))  # older runs: best_iteration
             for fold in spec["folds"]]
    # One scattered object holds everything the tasks share: keyword values given to ``client.map`` are packed as
    # tasks of their own, named after the keyword ("features" clashed with a task of that name in a CLI predict).
    boosters = client.scatter(BoosterSet(tokenize([raw for raw, _, _ in folds]), list(spec["features"]), folds),
                              broadcast=True, hash=False)
    token = tokenize(str(features_dir), boosters.key)
    futures = [client.submit(score_part, p, boosters, key=f"xgb-predict-{p.stem}-{token}", pure=False)
               for p in parts]
    frames = list(results_as_completed(client, futures))  # completion order: sorted by clip below
    return pd.concat(frames, ignore_index=True).set_index(VIDEO_ID).sort_index()


@dataclass(frozen=True)
class BoosterSet:
    """The fold boosters of a run as bytes, with their prior margins and rounds, and the feature columns they
    take in order; ``token`` names the set."""

    token: str
    features: list[str]
    folds: list[tuple[bytes, np.ndarray, int]]


_LOADED: dict[str, list[xgb.Booster]] = {}


def _loaded(boosters: BoosterSet) -> list[xgb.Booster]:
    """This worker process's boosters for the set, loaded on its first part (a dict of one: runs predict alone)."""
    if boosters.token not in _LOADED:
        _LOADED.clear()
        loaded = []
        for raw, _, _ in boosters.folds:
            booster = xgb.Booster()
            booster.load_model(bytearray(raw))
            booster.set_param({"nthread": worker_nthreads(default=1)})
            loaded.append(booster)
        _LOADED[boosters.token] = loaded
    return _LOADED[boosters.token]


def score_part(path: RunPath, boosters: BoosterSet) -> pd.DataFrame:
    """Dask task: the fold boosters' mean probabilities for one feature part's clips."""
    ids = np.array(read_table(path, columns=[VIDEO_ID]).column(0).to_pylist(), dtype=object)
    x = _read_part_matrix(path, boosters.features)
    if not len(x):
        return _frame(ids, np.zeros((0, len(CLASS_NAMES))))
    probas = [booster.inplace_predict(x, iteration_range=(0, rounds), base_margin=_margin_block(x, margin))
              for booster, (_, margin, rounds) in zip(_loaded(boosters), boosters.folds, strict=True)]
    return _frame(ids, np.mean(probas, axis=0))
