"""xgboost.dask over folds on a real 2-worker cluster: coverage, uneven partitions, placement, saved models."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost as xgb
from distributed import Client, get_task_stream, wait

from jungletrap.catalog import fold_masks
from jungletrap.config import XGBConfig
from jungletrap.metrics import mean_log_loss
from jungletrap.schema import CLASS_NAMES, VIDEO_ID
from jungletrap.stopping import stopping_mask
from jungletrap.xgb import (
    _fold_data,
    block_placement,
    fold_threads,
    fold_workers,
    kept_blocks,
    live_workers,
    load_feature_matrix,
    place_rows,
    predict_xgb_models,
    prior_margin,
    spread,
    take_rows,
    train_xgb_folds,
    xgb_params,
)


def test_take_rows_drops_empty_chunks() -> None:
    x = da.arange(12, chunks=4).reshape(12, 1).rechunk((4, 1))
    mask = np.zeros(12, bool)
    mask[[1, 2, 9]] = True
    out = take_rows(x, mask)
    assert out.chunks[0] == (2, 1) and out.compute().ravel().tolist() == [1, 2, 9]
    assert take_rows(x, np.zeros(12, bool)).shape[0] == 0


def test_block_placement_keeps_blocks_where_they_lie_and_feeds_every_worker() -> None:
    """A fold on every worker moves no block; on fewer workers only the others' blocks move, balanced."""
    assert block_placement(["a", "b", "a", "b"], ["a", "b"]) == ["a", "b", "a", "b"]
    assert block_placement(["a", "b", "a", "b"], ["b"]) == ["b"] * 4
    assert block_placement(["a", "a", "a", "c"], ["a", "b"]) == ["a", "a", "a", "b"]  # c trains no fold: to b
    assert block_placement(["a", "a", "a"], ["a", "b"]) == ["a", "a", "b"]  # b would be idle: gets a's last
    assert block_placement([None, None, None], ["a", "b"]) == ["a", "b", "a"]


def test_a_stage_that_starts_while_its_workers_restart_waits_for_one(tmp_path: Path) -> None:
    """Between stages the nannies may be restarting every worker: the feature matrix waits for one to connect
    (it divided by the empty worker count: the CLI's pipeline failed under load with ZeroDivisionError)."""
    class Restarting:
        def __init__(self) -> None:
            self.connected: dict[str, dict] = {}
            self.waited = 0

        def scheduler_info(self, n_workers: int) -> dict:
            return {"workers": self.connected}

        def wait_for_workers(self, n: int, timeout: float) -> None:
            self.waited += 1
            self.connected = {"tcp://w1": {}, "tcp://w0": {}}

    client = Restarting()
    assert live_workers(client) == ["tcp://w0", "tcp://w1"] and client.waited == 1  # type: ignore[arg-type]
    assert live_workers(client) == ["tcp://w0", "tcp://w1"] and client.waited == 1  # type: ignore[arg-type]


def test_a_block_already_placed_elsewhere_moves_to_the_new_placement(dask_client: Client) -> None:
    """Same data placed on one worker, then on the other while the first placement is still held (an earlier fold
    or training in the same session): every block lies on the worker asked for, not where the first one left it
    (``xgboost.dask`` would train on both, one with an empty matrix)."""
    labels = da.from_array(np.arange(40, dtype=np.float32).reshape(20, 2), chunks=(5, 2))
    first, second = sorted(dask_client.scheduler_info(n_workers=-1)["workers"])
    held = spread(dask_client, labels, [first], [None] * 4)
    moved = spread(dask_client, labels, [second], [first] * 4)
    for placement, worker in ((held, first), (moved, second)):
        wait(placement)
        behind = set(placement.__dask_graph__())  # the blocks in memory behind the concatenation
        who = {key: ws for key, ws in dask_client.who_has().items() if key in behind and ws}
        assert len(who) == 4 and {w for ws in who.values() for w in ws} == {worker}
    np.testing.assert_array_equal(moved.compute(), labels.compute())


def test_fold_matrices_quantise_on_the_workers_that_hold_their_rows(dask_client: Client, tmp_path: Path) -> None:
    """Each fold worker holds only its own blocks' rows (no float copy, no concatenation into one block)."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    Y = da.from_array(y, chunks=(matrix.X.chunks[0], y.shape[1]))
    train, _ = fold_masks(split, folds, 0)
    stop = stopping_mask(ids, y, train, fraction=0.125, seed=0)
    dtrain, dstop, workers = _fold_data(dask_client, matrix, Y, train & ~stop, stop, np.zeros(24, np.float32),
                                        XGBConfig(min_rows_per_worker=1))
    assert isinstance(dtrain, xgb.dask.DaskQuantileDMatrix) and isinstance(dstop, xgb.dask.DaskQuantileDMatrix)
    assert matrix.block_workers is not None and set(workers) == set(matrix.block_workers)
    for mask, dmatrix in ((train & ~stop, dtrain), (stop, dstop)):
        lies = Counter(matrix.block_workers[i] for i in kept_blocks(matrix.X, mask))
        assert {w: len(parts) for w, parts in dmatrix.worker_map.items()} == lies  # each block where it lay


def test_fold_placement_follows_rows_per_worker_and_takes_the_hosts_threads(dask_client: Client) -> None:
    workers = sorted(dask_client.scheduler_info(n_workers=-1)["workers"])
    assert len(workers) == 2
    assert fold_workers(dask_client, 100, XGBConfig()) == workers[:1]  # default: 10,000 rows per worker
    assert fold_workers(dask_client, 100, XGBConfig(min_rows_per_worker=60)) == workers[:1]
    assert fold_workers(dask_client, 100, XGBConfig(min_rows_per_worker=50)) == workers
    assert fold_workers(dask_client, 100, XGBConfig(min_rows_per_worker=1)) == workers
    assert fold_workers(dask_client, 0, XGBConfig()) == workers[:1]
    # one worker training alone uses its idle neighbour's thread too; two share the host's two threads
    assert fold_threads(dask_client, workers[:1]) == 2 and fold_threads(dask_client, workers) == 1
    # a worker lost between placing the fold and training it (a KeyError here failed the fold)
    gone = "tcp://127.0.0.1:9"
    assert fold_threads(dask_client, [workers[0], gone]) == 2 and fold_threads(dask_client, [gone]) == 1


def _feature_parts(root: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 24)) < 0.2).astype(np.float32)
    x = np.concatenate([y * 2 + rng.normal(0, 1, y.shape), rng.normal(0, 1, (n, 6))], axis=1).astype(np.float32)
    ids = np.array([f"v{i:03d}.mp4" for i in range(n)], dtype=object)
    bounds = [0, 10, 70, n]  # deliberately uneven parts
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        frame = pd.DataFrame(x[a:b], columns=[f"f{j}" for j in range(x.shape[1])])
        frame.insert(0, VIDEO_ID, ids[a:b])
        frame["status"], frame["error"] = "ok", None
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / f"part-{p:05d}.parquet")
    return ids, y


def _folds(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    features = tmp_path / "features"
    features.mkdir()
    ids, y = _feature_parts(features, 120, seed=0)
    split = np.where(np.arange(120) < 100, "train", "test")
    folds = np.where(split == "train", np.arange(120) // 34, -1)  # fold 0 = rows 0..33: spans two parts
    return features, ids, y, split, folds


#: One worker per fold (the default for so few rows) and data-parallel over both workers.
PLACEMENTS = {"one_worker": 10000, "both_workers": 1}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_folds_cover_every_training_row_once_and_saved_models_reproduce(dask_client: Client, tmp_path: Path,
                                                                         placement: str) -> None:
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    assert matrix.video_ids.tolist() == ids.tolist() and len(matrix.features) == 30
    cfg = XGBConfig(n_estimators=60, learning_rate=0.2, max_depth=2, early_stopping_rounds=10, max_bin=8,
                    min_rows_per_worker=PLACEMENTS[placement])
    models = tmp_path / "models"
    result = train_xgb_folds(dask_client, matrix, y, split, folds, cfg, seed=0, gpu=False, models_dir=models)
    oof = result["oof"].set_index(VIDEO_ID)
    assert sorted(oof.index) == sorted(ids[:100].tolist())
    truth = y[:100]
    prior = np.tile(truth.mean(axis=0), (100, 1))
    assert mean_log_loss(truth, oof.loc[ids[:100], list(CLASS_NAMES)].to_numpy()) < mean_log_loss(truth, prior)
    with get_task_stream(client=dask_client) as stream:
        again = predict_xgb_models(dask_client, models, features)
    # Predict holds one part per task, never a share of the whole table (no xgboost.dask matrix over it).
    keys = [str(t["key"]) for t in stream.data]
    assert all(k.startswith("xgb-predict-") for k in keys) and len(keys) == len(list(features.glob("part-*")))
    test = result["test"].set_index(VIDEO_ID)
    np.testing.assert_allclose(again.loc[test.index].to_numpy(), test.to_numpy(), rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in models.iterdir()) == ["features.json", "fold0.ubj", "fold1.ubj", "fold2.ubj"]
    # max_bin reaches every worker's histograms: no feature is split at more than max_bin - 1 thresholds
    splits = xgb.Booster(model_file=str(models / "fold0.ubj")).trees_to_dataframe().query("Feature != 'Leaf'")
    assert 1 < splits.groupby("Feature")["Split"].nunique().max() <= cfg.max_bin - 1


def test_the_matrix_and_a_folds_matrices_are_one_graph_layer_each(dask_client: Client, tmp_path: Path) -> None:
    """Graph size must not grow with the parts: concatenating persisted blocks gave one layer per part, and every
    fold matrix built over it cost time quadratic in the parts (minutes per fold at 782 parts)."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    assert matrix.X.numblocks[0] > 1 and len(matrix.X.__dask_graph__().layers) == 1
    Y = da.from_array(y, chunks=(matrix.X.chunks[0], y.shape[1]))
    train, _ = fold_masks(split, folds, 0)
    x, labels, margins = place_rows(dask_client, matrix, Y, train, kept_blocks(matrix.X, train),
                                    sorted(dask_client.scheduler_info(n_workers=-1)["workers"]), prior_margin(y))
    for a in (x, labels, margins):
        assert len(a.__dask_graph__().layers) == 1 and a.shape[0] == train.sum()
    np.testing.assert_array_equal(x.compute(), matrix.X.compute()[train])
    np.testing.assert_array_equal(labels.compute(), y[train])


def test_a_trained_fold_leaves_only_the_feature_matrix_on_the_workers(dask_client: Client, tmp_path: Path) -> None:
    """Each fold's row copies (fit, stopping, margins, quantised matrices) are released when the fold ends, not at
    the next garbage collection: they sit in reference cycles, and five folds' copies at once were 9x a worker's
    share of the features at 20,000 clips (a 200,000-clip run lost its workers)."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    wait(matrix.X)
    held = sum(bool(w) for w in dask_client.who_has().values())
    train_xgb_folds(dask_client, matrix, y, split, folds, XGBConfig(n_estimators=3, max_depth=2, min_rows_per_worker=1),
                    seed=0, gpu=False, models_dir=tmp_path / "models")
    time.sleep(0.5)  # the scheduler forgets released keys asynchronously
    assert sum(bool(w) for w in dask_client.who_has().values()) == held == matrix.X.numblocks[0]


def test_one_worker_and_both_workers_train_the_same_models(dask_client: Client, tmp_path: Path) -> None:
    """Placement is a speed choice only: with as many bins as rows, the quantile cuts are the same either way."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    results = [train_xgb_folds(dask_client, matrix, y, split, folds,
                               XGBConfig(n_estimators=30, max_depth=2, min_rows_per_worker=rows), seed=0, gpu=False,
                               models_dir=tmp_path / name) for name, rows in PLACEMENTS.items()]
    one, both = (r["oof"].set_index(VIDEO_ID).loc[ids[:100]] for r in results)
    np.testing.assert_allclose(one.to_numpy(), both.to_numpy(), rtol=1e-5, atol=1e-7)
    assert [f["best_iteration"] for f in results[0]["folds"]] == [f["best_iteration"] for f in results[1]["folds"]]


def test_every_training_worker_holds_fit_and_stopping_rows(dask_client: Client, tmp_path: Path) -> None:
    """``xgboost.dask`` trains on every worker holding a block of either matrix; each needs rows of both."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    Y = da.from_array(y, chunks=(matrix.X.chunks[0], y.shape[1]))
    train, _ = fold_masks(split, folds, 0)
    stop = stopping_mask(ids, y, train, fraction=0.125, seed=0)
    dtrain, dstop, workers = _fold_data(dask_client, matrix, Y, train & ~stop, stop, np.zeros(24, np.float32),
                                        XGBConfig(min_rows_per_worker=1))
    assert len(workers) == 2 and set(dtrain.worker_map) == set(dstop.worker_map) == set(workers)
    one_stop_row = np.zeros_like(stop)
    one_stop_row[np.flatnonzero(stop)[0]] = True  # fewer stopping rows than workers: train on fewer workers
    dtrain, dstop, workers = _fold_data(dask_client, matrix, Y, train & ~one_stop_row, one_stop_row,
                                        np.zeros(24, np.float32), XGBConfig(min_rows_per_worker=1))
    assert len(workers) == 1 and set(dtrain.worker_map) == set(dstop.worker_map) == set(workers)
    # the refit's single matrix (all training-fold rows) is spread over every worker its rows call for
    dtrain, dstop, workers = _fold_data(dask_client, matrix, Y, train, None, np.zeros(24, np.float32),
                                        XGBConfig(min_rows_per_worker=1))
    assert dstop is None and len(workers) == 2 and set(dtrain.worker_map) == set(workers)


@pytest.mark.parametrize("refit", [False, True])
def test_held_out_labels_never_reach_the_fold_booster(dask_client: Client, tmp_path: Path, refit: bool) -> None:
    """Early stopping on the inner split: flipping the held-out fold's labels leaves its predictions unchanged.

    Before, the booster stopped on the held-out fold, so its labels chose the round that then scored it. The refit
    (on every training-fold row) must not take the held-out rows in either.
    """
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    cfg = XGBConfig(n_estimators=80, learning_rate=0.3, max_depth=2, early_stopping_rounds=5, max_bin=16)
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    oof = [train_xgb_folds(dask_client, matrix, labels, split, folds, cfg, seed=0, gpu=False,
                           models_dir=tmp_path / name, stopping_fraction=0.2, refit=refit)["oof"].set_index(VIDEO_ID)
           for name, labels in (("models", y), ("flipped", flipped))]
    fold0 = ids[folds == 0]
    np.testing.assert_array_equal(oof[0].loc[fold0].to_numpy(), oof[1].loc[fold0].to_numpy())


@pytest.mark.parametrize("scale", [False, True])
def test_refit_trains_on_every_training_fold_row_for_the_chosen_rounds(dask_client: Client, tmp_path: Path,
                                                                       scale: bool) -> None:
    """Each fold's saved booster is a fit on fit + stopping rows for the stopping run's round count (scaled by
    1 / (1 - fraction) with ``scale``): a plain ``xgboost.train`` on those rows predicts the held-out fold the same."""
    features, ids, y, split, folds = _folds(tmp_path)
    matrix = load_feature_matrix(dask_client, features)
    cfg = XGBConfig(n_estimators=80, learning_rate=0.3, max_depth=2, early_stopping_rounds=5, max_bin=256)
    result = train_xgb_folds(dask_client, matrix, y, split, folds, cfg, seed=0, gpu=False, models_dir=tmp_path / "m",
                             stopping_fraction=0.2, refit=True, refit_scale=scale)
    fold = result["folds"][0]
    train, held = fold_masks(split, folds, 0)
    assert fold["refit"] and fold["n_model"] == fold["n_fit"] + fold["n_stopping"] == train.sum()
    assert fold["rounds"] == (round(fold["best_iteration"] / 0.8) if scale else fold["best_iteration"])
    booster = xgb.Booster(model_file=str(tmp_path / "m" / "fold0.ubj"))
    assert booster.num_boosted_rounds() == fold["rounds"]
    x = np.concatenate([pd.read_parquet(p).filter(like="f").to_numpy(np.float32)
                        for p in sorted(features.glob("part-*.parquet"))])
    margin = prior_margin(y[train])
    local = xgb.train({**xgb_params(cfg, seed=0, gpu=False), "nthread": 1},
                      xgb.DMatrix(x[train], y[train], base_margin=np.tile(margin, (train.sum(), 1))),
                      num_boost_round=fold["rounds"])
    expected = local.predict(xgb.DMatrix(x[held], base_margin=np.tile(margin, (held.sum(), 1))))
    oof = result["oof"].set_index(VIDEO_ID).loc[ids[held], list(CLASS_NAMES)].to_numpy()
    np.testing.assert_allclose(oof, expected, rtol=1e-5, atol=1e-7)
