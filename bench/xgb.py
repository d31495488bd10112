"""XGBoost benchmark: ``xgboost.dask`` vs one process on the same threads, and the multi-label strategies.

Run: ``python -m bench.xgb [--run-dir runs/demo] [--repeats 3]``. On a finished run's feature table, its
``config.yaml`` (``train.xgb``), its folds and the per-class prior base margins, it measures in one run:
- ``single_s``: ``xgb.train`` on in-memory ``DMatrix`` es with ``nthread`` = the cluster's total threads (2),
  every fold with early stopping, OOF and test predictions (what ``train_xgb_folds`` does, minus Dask);
- ``dask_s``: ``jungletrap.xgb.train_xgb_folds`` on a 2-worker x 1-thread process ``LocalCluster``
  (``DaskDMatrix`` construction included; ``cluster_start_s`` and ``persist_s`` of ``load_feature_matrix`` are
  reported apart); ``xgb_dask_over_single`` = dask / single (target <= 1.5) and ``oof_loss_rel_diff`` =
  (dask - single) / single OOF log loss (target |diff| <= 1%);
- the multi-label strategies, single-process on the same folds: ``multi_strategy`` ``one_output_per_tree`` and
  ``multi_output_tree`` (one booster per fold), and ``binary_per_class`` (24 boosters per fold, each with its own
  early stopping) -- time and OOF log loss of each, against the fold-prior baseline. The OOF loss is also
  given ``nested`` (early stopping on another fold, see ``_fold_masks``), which is the fair ranking: stopping
  on the scored fold favours the strategy that picks the most stopping points there.
Times are medians of ``--repeats`` calls after one warm-up call. ``nthread=2`` OpenMP on 2 cores slows down
many-fold when anything else runs (each barrier waits for a descheduled thread); ``load_avg_1m`` is printed so
a skewed run can be recognised, and the raw times are saved beside the medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost as xgb
from distributed import Client, LocalCluster, wait

from bench.common import median_seconds, print_table, save_results
from jungletrap.catalog import CATALOG_NAME
from jungletrap.config import XGBConfig, load_config
from jungletrap.features import FEATURES_DIR
from jungletrap.metrics import fold_prior_predictions, mean_log_loss
from jungletrap.schema import CLASS_NAMES, ERROR, FOLD, SPLIT, SPLIT_TEST, SPLIT_TRAIN, STATUS, VIDEO_ID
from jungletrap.xgb import load_feature_matrix, prior_margin, train_xgb_folds, xgb_params

#: The cluster the pipeline runs XGBoost on by default: 2 worker processes x 1 thread.
N_WORKERS, THREADS_PER_WORKER = 2, 1
NTHREAD = N_WORKERS * THREADS_PER_WORKER
STRATEGIES = ("one_output_per_tree", "multi_output_tree", "binary_per_class")

#: What one strategy returns: OOF probabilities over every row (NaN outside the training rows), test
#: probabilities averaged over the folds, and the kept rounds (per fold, or per fold x class).
Fit = tuple[np.ndarray, np.ndarray, list[int]]


def read_features(features_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The feature table in memory, same rows and column order as ``load_feature_matrix``."""
    parts = sorted(features_dir.glob("part-*.parquet"))
    schema = pq.read_schema(parts[0])
    features = [f.name for f in schema if f.name not in {VIDEO_ID, STATUS, ERROR} and pa.types.is_floating(f.type)]
    tables = [pq.read_table(p, columns=[VIDEO_ID, *features]) for p in parts]
    table = pa.concat_tables([t for t in tables if t.num_rows])
    X = table.select(features).to_pandas().to_numpy(np.float32)
    return X, np.array(table.column(VIDEO_ID).to_pylist(), dtype=object), features


def _params(cfg: XGBConfig, *, seed: int) -> dict[str, Any]:
    return {**xgb_params(cfg, seed=seed, gpu=False), "nthread": NTHREAD}


def _full(margin: np.ndarray, n: int) -> np.ndarray:
    """The base margin of ``n`` rows: ``margin`` is one value per class, or a single class's value."""
    return np.broadcast_to(margin, (n, *np.shape(margin))).astype(np.float32)


def _predict(booster: xgb.Booster, X: np.ndarray, margin: np.ndarray, n_rounds: int) -> np.ndarray:
    return booster.inplace_predict(X, iteration_range=(0, n_rounds), base_margin=_full(margin, len(X)))


def _fold_masks(split: np.ndarray, folds: np.ndarray, *,
                nested: bool = False) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold ``k``: (k, fit rows, early-stopping rows, scored rows).

    As in ``train_xgb_folds``, fold ``k`` both stops and is scored. ``nested`` stops on the next fold instead
    (left out of the fit rows), so the score of fold ``k`` is untouched by the choice of rounds: per-class
    early stopping picks 24 numbers on the stopping rows where one booster picks one, and only this protocol
    shows how much of its gain is that selection.
    """
    is_train = split == SPLIT_TRAIN
    ks = sorted(set(folds[is_train].tolist()))
    out = []
    for i, k in enumerate(ks):
        score = is_train & (folds == k)
        stop = is_train & (folds == ks[(i + 1) % len(ks)]) if nested else score
        out.append((k, is_train & ~score & ~stop, stop, score))
    return out


def fit_single(X: np.ndarray, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *, seed: int,
               models_dir: Path, nested: bool = False) -> Fit:
    """``train_xgb_folds`` in one process: one multi-label booster per fold (``cfg.multi_strategy``)."""
    is_test = split == SPLIT_TEST
    oof, tests, rounds = np.full(Y.shape, np.nan), list[np.ndarray](), []
    for k, fit, stop, score in _fold_masks(split, folds, nested=nested):
        margin = prior_margin(Y[fit])
        dtrain = xgb.DMatrix(X[fit], Y[fit], base_margin=_full(margin, fit.sum()), nthread=NTHREAD)
        dvalid = xgb.DMatrix(X[stop], Y[stop], base_margin=_full(margin, stop.sum()), nthread=NTHREAD)
        booster = xgb.train(_params(cfg, seed=seed + k), dtrain, num_boost_round=cfg.n_estimators,
                            evals=[(dvalid, "valid")], early_stopping_rounds=cfg.early_stopping_rounds,
                            verbose_eval=False)
        n_rounds = int(booster.best_iteration) + 1
        booster.save_model(models_dir / f"fold{k}.ubj")
        oof[score] = _predict(booster, X[score], margin, n_rounds)
        tests.append(_predict(booster, X[is_test], margin, n_rounds))
        rounds.append(n_rounds)
    return oof, np.mean(tests, axis=0), rounds


def fit_binary_per_class(X: np.ndarray, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *,
                         seed: int, models_dir: Path, nested: bool = False) -> Fit:
    """One ``binary:logistic`` booster per class and fold, each early-stopped on its own validation loss.

    The fold's two ``DMatrix`` es are built once and relabelled per class, so the histogram index (the
    quantile cuts of 2.5k features) is computed once per fold, as a careful implementation would.
    """
    is_test = split == SPLIT_TEST
    oof, test, rounds = np.full(Y.shape, np.nan), np.zeros((is_test.sum(), Y.shape[1])), []
    folds_seen = _fold_masks(split, folds, nested=nested)
    for k, fit, stop, score in folds_seen:
        margin = prior_margin(Y[fit])
        dtrain = xgb.DMatrix(X[fit], nthread=NTHREAD)
        dvalid = xgb.DMatrix(X[stop], nthread=NTHREAD)
        for c in range(Y.shape[1]):
            dtrain.set_info(label=Y[fit, c], base_margin=_full(margin[c], fit.sum()))
            dvalid.set_info(label=Y[stop, c], base_margin=_full(margin[c], stop.sum()))
            booster = xgb.train(_params(cfg, seed=seed + k), dtrain, num_boost_round=cfg.n_estimators,
                                evals=[(dvalid, "valid")], early_stopping_rounds=cfg.early_stopping_rounds,
                                verbose_eval=False)
            n_rounds = int(booster.best_iteration) + 1
            booster.save_model(models_dir / f"fold{k}_class{c}.ubj")
            oof[score, c] = _predict(booster, X[score], margin[c], n_rounds)
            test[:, c] += _predict(booster, X[is_test], margin[c], n_rounds)
            rounds.append(n_rounds)
    return oof, test / len(folds_seen), rounds


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds of ``fn``, the raw times, and the result of its last call (every call is deterministic)."""
    last: list[Any] = []
    seconds, times = median_seconds(lambda: last.append(fn()), repeats=repeats)
    return seconds, times, last[-1]


def _fold_losses(Y: np.ndarray, oof: np.ndarray, split: np.ndarray, folds: np.ndarray) -> list[float]:
    return [mean_log_loss(Y[score], oof[score]) for _, _, _, score in _fold_masks(split, folds)]


def measure_strategies(X: np.ndarray, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *,
                       seed: int, repeats: int, work: Path) -> dict[str, Any]:
    is_train = split == SPLIT_TRAIN
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        models_dir = work / strategy
        models_dir.mkdir()
        fit, s_cfg = fit_single, cfg.model_copy(update={"multi_strategy": strategy})
        if strategy == "binary_per_class":
            fit, s_cfg = fit_binary_per_class, cfg
        run = functools.partial(fit, X, Y, split, folds, s_cfg, seed=seed, models_dir=models_dir)
        seconds, times, (oof, _, rounds) = _timed(run, repeats)
        out[f"strategy_{strategy}_s"] = seconds
        out[f"strategy_{strategy}_s_runs"] = times
        out[f"strategy_{strategy}_oof_log_loss"] = mean_log_loss(Y[is_train], oof[is_train])
        out[f"strategy_{strategy}_fold_log_loss"] = _fold_losses(Y, oof, split, folds)
        out[f"strategy_{strategy}_mean_rounds"] = float(np.mean(rounds))
        oof, _, _ = run(nested=True)
        out[f"strategy_{strategy}_nested_oof_log_loss"] = mean_log_loss(Y[is_train], oof[is_train])
    return out


def measure_dask(run_dir: Path, X: np.ndarray, video_ids: np.ndarray, features: list[str], Y: np.ndarray,
                 split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *, seed: int, repeats: int,
                 work: Path) -> dict[str, Any]:
    """``train_xgb_folds`` on a fresh cluster; checks the persisted matrix equals the in-memory one."""
    start = time.perf_counter()
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.wait_for_workers(N_WORKERS)
        cluster_start_s = time.perf_counter() - start
        start = time.perf_counter()
        matrix = load_feature_matrix(client, run_dir / FEATURES_DIR)
        wait(matrix.X)
        persist_s = time.perf_counter() - start
        if matrix.features != features or list(matrix.video_ids) != list(video_ids):
            raise RuntimeError("load_feature_matrix and read_features disagree on rows or columns")
        if not np.array_equal(matrix.X.compute(), X, equal_nan=True):
            raise RuntimeError("the persisted feature matrix differs from the one read in memory")
        # One training at a time: median_seconds calls sequentially, never two xgboost.dask models at once.
        dask_s, dask_runs, result = _timed(lambda: train_xgb_folds(
            client, matrix, Y, split, folds, cfg, seed=seed, gpu=False, models_dir=work / "dask"), repeats)
    oof = result["oof"].set_index(VIDEO_ID).loc[video_ids[split == SPLIT_TRAIN], list(CLASS_NAMES)].to_numpy()
    return {"cluster_start_s": cluster_start_s, "persist_s": persist_s, "dask_s": dask_s, "dask_s_runs": dask_runs,
            "dask_oof_log_loss": mean_log_loss(Y[split == SPLIT_TRAIN], oof),
            "dask_mean_rounds": float(np.mean([f["best_iteration"] for f in result["folds"]]))}


def measure(run_dir: Path, *, repeats: int) -> dict[str, Any]:
    cfg = load_config(run_dir / "config.yaml")
    xcfg, seed = cfg.train.xgb, cfg.run.seed
    X, video_ids, features = read_features(run_dir / FEATURES_DIR)
    rows = pd.read_parquet(run_dir / CATALOG_NAME).set_index(VIDEO_ID).loc[video_ids]
    Y, split, folds = rows[list(CLASS_NAMES)].to_numpy(np.float32), rows[SPLIT].to_numpy(), rows[FOLD].to_numpy()
    is_train = split == SPLIT_TRAIN
    with tempfile.TemporaryDirectory(prefix="bench-xgb-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "rows_train": int(is_train.sum()), "rows_test": int((split == SPLIT_TEST).sum()),
            "features": len(features), "multi_strategy": xcfg.multi_strategy,
            "prior_oof_log_loss": mean_log_loss(Y[is_train], fold_prior_predictions(Y[is_train], folds[is_train])),
        }
        # Single-process work first, with no cluster alive to compete for the two cores.
        result.update(measure_strategies(X, Y, split, folds, xcfg, seed=seed, repeats=repeats, work=work))
        result["single_s"] = result[f"strategy_{xcfg.multi_strategy}_s"]
        result["single_oof_log_loss"] = result[f"strategy_{xcfg.multi_strategy}_oof_log_loss"]
        result.update(measure_dask(run_dir, X, video_ids, features, Y, split, folds, xcfg, seed=seed,
                                   repeats=repeats, work=work))
    result["xgb_dask_over_single"] = result["dask_s"] / result["single_s"]
    result["oof_loss_rel_diff"] = (result["dask_oof_log_loss"] - result["single_oof_log_loss"]) / result[
        "single_oof_log_loss"]
    result.update(_rank_strategies(result))
    return result


def _rank_strategies(r: dict[str, Any]) -> dict[str, Any]:
    losses = {s: r[f"strategy_{s}_oof_log_loss"] for s in STRATEGIES}
    best, runner_up = sorted(losses, key=losses.__getitem__)[:2]
    nested = {s: r[f"strategy_{s}_nested_oof_log_loss"] for s in STRATEGIES}
    nested_best, nested_runner_up = sorted(nested, key=nested.__getitem__)[:2]
    won = [a < b for a, b in zip(r[f"strategy_{best}_fold_log_loss"], r[f"strategy_{runner_up}_fold_log_loss"],
                                 strict=True)]
    return {"strategy_best": best, "strategy_best_margin_vs_next": losses[runner_up] - losses[best],
            "strategy_best_folds_won": sum(won), "strategy_best_nested": nested_best,
            "strategy_best_nested_margin_vs_next": nested[nested_runner_up] - nested[nested_best]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    r = measure(args.run_dir, repeats=args.repeats)
    r["bench_seconds"] = time.perf_counter() - start
    r["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    print_table(f"xgb ({args.run_dir}: {r['rows_train']} train + {r['rows_test']} test rows x {r['features']} "
                f"features, {NTHREAD} threads, medians of {args.repeats})", [
        ("single_s", r["single_s"], f"xgb.train, nthread={NTHREAD}, {r['multi_strategy']}, all folds"),
        ("dask_s", r["dask_s"], f"train_xgb_folds, {N_WORKERS} workers x {THREADS_PER_WORKER} thread"),
        ("xgb_dask_over_single", r["xgb_dask_over_single"], "target <= 1.5"),
        ("single_oof_log_loss", r["single_oof_log_loss"], ""),
        ("dask_oof_log_loss", r["dask_oof_log_loss"], ""),
        ("oof_loss_rel_diff", r["oof_loss_rel_diff"], "(dask - single) / single, target |diff| <= 0.01"),
        ("cluster_start_s", r["cluster_start_s"], "LocalCluster + Client, not in dask_s"),
        ("persist_s", r["persist_s"], "load_feature_matrix + wait, not in dask_s"),
        ("prior_oof_log_loss", r["prior_oof_log_loss"], "fold-prior baseline"),
        *[(f"strategy_{s}_{m}", r[f"strategy_{s}_{m}"], note) for s in STRATEGIES
          for m, note in (("s", "single-process, all folds"), ("oof_log_loss", "stops on the scored fold"),
                          ("nested_oof_log_loss", "stops on another fold"),
                          ("mean_rounds", "rounds kept per booster"))],
        ("strategy_best", r["strategy_best"], "lowest OOF log loss"),
        ("strategy_best_margin_vs_next", r["strategy_best_margin_vs_next"], "OOF log loss gap to the runner-up"),
        ("strategy_best_folds_won", r["strategy_best_folds_won"], "folds where it beats the runner-up"),
        ("strategy_best_nested", r["strategy_best_nested"], "lowest nested OOF log loss"),
        ("strategy_best_nested_margin_vs_next", r["strategy_best_nested_margin_vs_next"], "gap to the runner-up"),
        ("bench_seconds", r["bench_seconds"], ""),
        ("load_avg_1m", "{:.2f} -> {:.2f}".format(*r["load_avg_1m"]), "other load skews nthread=2 times badly"),
    ])
    save_results("xgb", r)
    return r


if __name__ == "__main__":
    main()
