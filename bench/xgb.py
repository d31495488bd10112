"""XGBoost benchmark: ``xgboost.dask`` vs one process on the same threads, and the multi-label strategies.

Run: ``python -m bench.xgb [--run-dir runs/demo] [--repeats 1] [--set train.xgb.max_bin=64] [--data-parallel]
[--strategies [--no-nested]]``. On a finished run's feature table, its ``config.yaml`` (``train.xgb``, with any
``--set`` overrides), its folds and the per-class prior base margins, it measures in one run:
- ``single_s``: ``xgb.train`` on in-memory ``DMatrix`` es with ``nthread`` = the cluster's total threads (2),
  every fold with early stopping, OOF and test predictions (what ``train_xgb_folds`` does, minus Dask);
  ``single_nthread1_s`` the same with one thread (what one worker has);
- ``dask_s``: ``jungletrap.xgb.train_xgb_folds`` on a 2-worker x 1-thread process ``LocalCluster`` as the
  pipeline runs it (``DaskDMatrix`` construction and predictions included; ``cluster_start_s`` and ``persist_s``
  of ``load_feature_matrix`` are reported apart; ``dask_workers_per_fold`` and ``dask_threads_per_worker`` say
  where the folds trained, see ``train.xgb.min_rows_per_worker``); ``xgb_dask_over_single`` = dask / single
  (target <= 1.5) and ``oof_loss_rel_diff`` = (dask - single) / single OOF log loss (target |diff| <= 1%);
- ``--data-parallel``: also ``dask_all_workers_s``, every fold's rows split over both workers
  (``min_rows_per_worker=1``): the cost of ``xgboost.dask``'s histogram allreduce at this size;
- ``--strategies``: the multi-label strategies, single-process on the same folds: ``multi_strategy``
  ``one_output_per_tree`` and ``multi_output_tree`` (one booster per fold), and ``binary_per_class`` (24 boosters
  per fold, each with its own early stopping) -- time and OOF log loss of each, against the fold-prior baseline.
  The OOF loss is also given ``nested`` (early stopping on another fold, see ``_fold_masks``), which is the fair
  ranking: stopping on the scored fold favours the strategy that picks the most stopping points there.
The cluster starts first; the single-process and dask calls then alternate, repeat by repeat (the idle workers
cost nothing meanwhile), so that other load on the machine falls on every variant alike. Each variant gets one
warm-up call with ``n_estimators=1`` (imports, thread pools, the workers' first ``xgboost.dask`` task); times
are medians of ``--repeats`` calls (``--strategy-repeats`` for the strategies, run before the cluster starts),
raw times saved beside them. Cost on 2 cores with the demo's 2.6k features: default flags about 2 minutes at
``max_bin`` 256 (1.5 at 64); ``--data-parallel`` adds about 2.5 minutes, ``--strategies`` about 12
(``multi_output_tree`` is by far the slowest). ``nthread=2`` OpenMP on 2 cores slows down many-fold when
anything else runs (each barrier waits for a descheduled thread, so one thread can be faster);
``load_avg_1m`` is printed so a skewed run can be recognised.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
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

from bench.common import print_table, save_results
from jungletrap.catalog import CATALOG_NAME, fold_masks
from jungletrap.config import XGBConfig, load_config
from jungletrap.features import FEATURES_DIR
from jungletrap.metrics import fold_prior_predictions, mean_log_loss
from jungletrap.schema import CLASS_NAMES, ERROR, FOLD, SPLIT, SPLIT_TEST, SPLIT_TRAIN, STATUS, VIDEO_ID
from jungletrap.xgb import (
    FeatureMatrix,
    fold_threads,
    fold_workers,
    load_feature_matrix,
    prior_margin,
    train_xgb_folds,
    xgb_params,
)

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


def _params(cfg: XGBConfig, *, seed: int, nthread: int = NTHREAD) -> dict[str, Any]:
    return {**xgb_params(cfg, seed=seed, gpu=False), "nthread": nthread}


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
               models_dir: Path, nested: bool = False, nthread: int = NTHREAD) -> Fit:
    """``train_xgb_folds`` in one process: one multi-label booster per fold (``cfg.multi_strategy``)."""
    is_test = split == SPLIT_TEST
    oof, tests, rounds = np.full(Y.shape, np.nan), list[np.ndarray](), []
    for k, fit, stop, score in _fold_masks(split, folds, nested=nested):
        margin = prior_margin(Y[fit])
        dtrain = xgb.DMatrix(X[fit], Y[fit], base_margin=_full(margin, fit.sum()), nthread=nthread)
        dvalid = xgb.DMatrix(X[stop], Y[stop], base_margin=_full(margin, stop.sum()), nthread=nthread)
        booster = xgb.train(_params(cfg, seed=seed + k, nthread=nthread), dtrain, num_boost_round=cfg.n_estimators,
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
    """Median seconds of ``repeats`` calls of ``fn``, the raw times, and the last call's result (all the same)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def _fold_losses(Y: np.ndarray, oof: np.ndarray, split: np.ndarray, folds: np.ndarray) -> list[float]:
    return [mean_log_loss(Y[score], oof[score]) for _, _, _, score in _fold_masks(split, folds)]


def _one_round(cfg: XGBConfig) -> XGBConfig:
    return cfg.model_copy(update={"n_estimators": 1})


def measure_strategies(X: np.ndarray, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *,
                       seed: int, strategy_repeats: int, nested: bool, work: Path) -> dict[str, Any]:
    """Every multi-label strategy on the same folds, single-process with ``NTHREAD`` threads."""
    is_train = split == SPLIT_TRAIN
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        models_dir = work / strategy
        models_dir.mkdir()
        fit: Callable[..., Fit] = fit_single
        s_cfg = cfg.model_copy(update={"multi_strategy": strategy})
        if strategy == "binary_per_class":
            fit, s_cfg = fit_binary_per_class, cfg
        run = functools.partial(fit, X, Y, split, folds, s_cfg, seed=seed, models_dir=models_dir)
        seconds, times, (oof, _, rounds) = _timed(run, strategy_repeats)
        out[f"strategy_{strategy}_s"] = seconds
        out[f"strategy_{strategy}_s_runs"] = times
        out[f"strategy_{strategy}_oof_log_loss"] = mean_log_loss(Y[is_train], oof[is_train])
        out[f"strategy_{strategy}_fold_log_loss"] = _fold_losses(Y, oof, split, folds)
        out[f"strategy_{strategy}_mean_rounds"] = float(np.mean(rounds))
        if nested:
            oof, _, _ = run(nested=True)
            out[f"strategy_{strategy}_nested_oof_log_loss"] = mean_log_loss(Y[is_train], oof[is_train])
            out[f"strategy_{strategy}_nested_fold_log_loss"] = _fold_losses(Y, oof, split, folds)
    return out


#: One timed variant: config in, (OOF probabilities of the training rows in ``video_ids`` order, rounds per fold).
Variant = Callable[[XGBConfig], tuple[np.ndarray, list[int]]]


def _single_variant(X: np.ndarray, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, *, seed: int,
                    nthread: int, models_dir: Path) -> Variant:
    models_dir.mkdir()

    def run(cfg: XGBConfig) -> tuple[np.ndarray, list[int]]:
        oof, _, rounds = fit_single(X, Y, split, folds, cfg, seed=seed, models_dir=models_dir, nthread=nthread)
        return oof[split == SPLIT_TRAIN], rounds
    return run


def _dask_variant(client: Client, matrix: FeatureMatrix, Y: np.ndarray, split: np.ndarray, folds: np.ndarray, *,
                  seed: int, models_dir: Path, min_rows_per_worker: int | None = None) -> Variant:
    def run(cfg: XGBConfig) -> tuple[np.ndarray, list[int]]:
        if min_rows_per_worker is not None:
            cfg = cfg.model_copy(update={"min_rows_per_worker": min_rows_per_worker})
        result = train_xgb_folds(client, matrix, Y, split, folds, cfg, seed=seed, gpu=False, models_dir=models_dir)
        oof = result["oof"].set_index(VIDEO_ID).loc[matrix.video_ids[split == SPLIT_TRAIN], list(CLASS_NAMES)]
        return oof.to_numpy(), [f["best_iteration"] for f in result["folds"]]
    return run


def measure_timings(run_dir: Path, X: np.ndarray, video_ids: np.ndarray, features: list[str], Y: np.ndarray,
                    split: np.ndarray, folds: np.ndarray, cfg: XGBConfig, *, seed: int, repeats: int,
                    data_parallel: bool, work: Path) -> dict[str, Any]:
    """``single``, ``single_nthread1`` and ``dask`` (``dask_all_workers``), interleaved call by call.

    The cluster starts first and idles through the single-process calls, so that other load on the machine, which
    changes by the minute on a shared 2-core box, falls on every variant alike. Calls run one after another:
    never two ``xgboost.dask`` trainings at once. The persisted feature matrix is checked against the one in memory.
    """
    start = time.perf_counter()
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.wait_for_workers(N_WORKERS)
        out: dict[str, Any] = {"cluster_start_s": time.perf_counter() - start}
        start = time.perf_counter()
        matrix = load_feature_matrix(client, run_dir / FEATURES_DIR)
        wait(matrix.X)
        out["persist_s"] = time.perf_counter() - start
        if matrix.features != features or list(matrix.video_ids) != list(video_ids):
            raise RuntimeError("load_feature_matrix and read_features disagree on rows or columns")
        if not np.array_equal(matrix.X.compute(), X, equal_nan=True):
            raise RuntimeError("the persisted feature matrix differs from the one read in memory")
        variants = {
            "single": _single_variant(X, Y, split, folds, seed=seed, nthread=NTHREAD, models_dir=work / "single"),
            "single_nthread1": _single_variant(X, Y, split, folds, seed=seed, nthread=THREADS_PER_WORKER,
                                               models_dir=work / "single_nthread1"),
            "dask": _dask_variant(client, matrix, Y, split, folds, seed=seed, models_dir=work / "dask"),
        }
        if data_parallel:
            variants["dask_all_workers"] = _dask_variant(client, matrix, Y, split, folds, seed=seed,
                                                         models_dir=work / "dask_all_workers", min_rows_per_worker=1)
        for run in variants.values():
            run(_one_round(cfg))  # warm-up: imports, thread pools, the workers' first xgboost.dask task
        times: dict[str, list[float]] = {name: [] for name in variants}
        results = {}
        for _ in range(repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                results[name] = run(cfg)  # deterministic: every call gives the same models
                times[name].append(time.perf_counter() - start)
        n_fit = [int(fold_masks(split, folds, k)[0].sum()) for k in sorted(set(folds[split == SPLIT_TRAIN]))]
        out["dask_workers_per_fold"] = [len(fold_workers(client, n, cfg)) for n in n_fit]
        out["dask_threads_per_worker"] = [fold_threads(client, fold_workers(client, n, cfg)) for n in n_fit]
    truth = Y[split == SPLIT_TRAIN]
    for name, (oof, rounds) in results.items():
        out |= {f"{name}_s": statistics.median(times[name]), f"{name}_s_runs": times[name],
                f"{name}_oof_log_loss": mean_log_loss(truth, oof), f"{name}_mean_rounds": float(np.mean(rounds))}
    return out


def measure(run_dir: Path, *, repeats: int, overrides: list[str] | None = None, data_parallel: bool = False,
            strategies: bool = False, strategy_repeats: int = 1, nested: bool = True) -> dict[str, Any]:
    cfg = load_config(run_dir / "config.yaml", overrides)
    xcfg, seed = cfg.train.xgb, cfg.run.seed
    X, video_ids, features = read_features(run_dir / FEATURES_DIR)
    rows = pd.read_parquet(run_dir / CATALOG_NAME).set_index(VIDEO_ID).loc[video_ids]
    Y, split, folds = rows[list(CLASS_NAMES)].to_numpy(np.float32), rows[SPLIT].to_numpy(), rows[FOLD].to_numpy()
    is_train = split == SPLIT_TRAIN
    with tempfile.TemporaryDirectory(prefix="bench-xgb-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "rows_train": int(is_train.sum()), "rows_test": int((split == SPLIT_TEST).sum()),
            "features": len(features), "overrides": list(overrides or []), "xgb_config": xcfg.model_dump(),
            "prior_oof_log_loss": mean_log_loss(Y[is_train], fold_prior_predictions(Y[is_train], folds[is_train])),
        }
        if strategies:  # before the cluster starts: nothing else on the two cores
            result |= measure_strategies(X, Y, split, folds, xcfg, seed=seed, strategy_repeats=strategy_repeats,
                                         nested=nested, work=work)
        result |= measure_timings(run_dir, X, video_ids, features, Y, split, folds, xcfg, seed=seed,
                                  repeats=repeats, data_parallel=data_parallel, work=work)
    for name in ("dask", "dask_all_workers"):
        if f"{name}_s" in result:
            result[f"xgb_{name}_over_single"] = result[f"{name}_s"] / result["single_s"]
            result[f"{name}_oof_loss_rel_diff"] = (result[f"{name}_oof_log_loss"] - result["single_oof_log_loss"]
                                                  ) / result["single_oof_log_loss"]
    result["oof_loss_rel_diff"] = result.pop("dask_oof_loss_rel_diff")
    result["xgb_dask_over_single_nthread1"] = result["dask_s"] / result["single_nthread1_s"]
    if strategies:
        result |= _rank_strategies(result)
    return result


def _rank_strategies(r: dict[str, Any]) -> dict[str, Any]:
    """The best strategy by OOF log loss, stopping on the scored fold and (when measured) nested."""
    out: dict[str, Any] = {}
    for protocol in ("", "nested_"):
        if f"strategy_{STRATEGIES[0]}_{protocol}oof_log_loss" not in r:
            continue
        losses = {s: r[f"strategy_{s}_{protocol}oof_log_loss"] for s in STRATEGIES}
        best, runner_up = sorted(losses, key=losses.__getitem__)[:2]
        won = [a < b for a, b in zip(r[f"strategy_{best}_{protocol}fold_log_loss"],
                                     r[f"strategy_{runner_up}_{protocol}fold_log_loss"], strict=True)]
        key = "strategy_best" + (f"_{protocol.rstrip('_')}" if protocol else "")
        out |= {key: best, f"{key}_margin_vs_next": losses[runner_up] - losses[best], f"{key}_folds_won": sum(won)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls of single_s and dask_s (each after a one-round warm-up call)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the run's config, e.g. train.xgb.max_bin=64 (repeatable)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="also time every fold split over both workers (min_rows_per_worker=1)")
    parser.add_argument("--strategies", action="store_true", help="also compare the multi-label strategies")
    parser.add_argument("--strategy-repeats", type=int, default=1, help="timed calls of each strategy")
    parser.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                        help="with --strategies: also score each with early stopping on another fold")
    args = parser.parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    r = measure(args.run_dir, repeats=args.repeats, overrides=args.overrides, data_parallel=args.data_parallel,
                strategies=args.strategies, strategy_repeats=args.strategy_repeats, nested=args.nested)
    r["bench_seconds"] = time.perf_counter() - start
    r["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    rows = [(key, value, note) for key, value, note in _table_rows(r) if key in r]
    rows.append(("load_avg_1m", "{:.2f} -> {:.2f}".format(*r["load_avg_1m"]), "other load skews nthread=2 times"))
    x = r["xgb_config"]
    print_table(f"xgb ({args.run_dir}: {r['rows_train']} train + {r['rows_test']} test rows x {r['features']} "
                f"features, {x['multi_strategy']}, max_bin {x['max_bin']}, {NTHREAD} threads; medians of "
                f"{args.repeats})", rows)
    save_results("xgb", r)
    return r


def _table_rows(r: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Rows of the printed table; a key the run did not measure (no ``--strategies``...) is left out by the caller."""
    return [
        ("single_s", r["single_s"], f"xgb.train, nthread={NTHREAD}, all folds"),
        ("dask_s", r["dask_s"], f"train_xgb_folds, {N_WORKERS} workers x {THREADS_PER_WORKER} thread"),
        ("dask_workers_per_fold", str(r["dask_workers_per_fold"]), "workers each fold trained on"),
        ("dask_threads_per_worker", str(r["dask_threads_per_worker"]), "their xgboost nthread"),
        ("xgb_dask_over_single", r["xgb_dask_over_single"], "target <= 1.5"),
        ("single_oof_log_loss", r["single_oof_log_loss"], ""),
        ("dask_oof_log_loss", r["dask_oof_log_loss"], ""),
        ("oof_loss_rel_diff", r["oof_loss_rel_diff"], "(dask - single) / single, target |diff| <= 0.01"),
        ("single_mean_rounds", r["single_mean_rounds"], "rounds kept per fold"),
        ("dask_mean_rounds", r["dask_mean_rounds"], ""),
        ("single_nthread1_s", r["single_nthread1_s"], "xgb.train, nthread=1"),
        ("xgb_dask_over_single_nthread1", r["xgb_dask_over_single_nthread1"], "dask over one thread"),
        ("dask_all_workers_s", r.get("dask_all_workers_s"), "every fold split over both workers"),
        ("xgb_dask_all_workers_over_single", r.get("xgb_dask_all_workers_over_single"), ""),
        ("dask_all_workers_oof_loss_rel_diff", r.get("dask_all_workers_oof_loss_rel_diff"), ""),
        ("cluster_start_s", r["cluster_start_s"], "LocalCluster + Client, not in dask_s"),
        ("persist_s", r["persist_s"], "load_feature_matrix + wait, not in dask_s"),
        ("prior_oof_log_loss", r["prior_oof_log_loss"], "fold-prior baseline"),
        *[(f"strategy_{s}_{m}", r.get(f"strategy_{s}_{m}"), note) for s in STRATEGIES
          for m, note in (("s", "single-process, all folds"), ("oof_log_loss", "stops on the scored fold"),
                          ("nested_oof_log_loss", "stops on another fold"),
                          ("mean_rounds", "rounds kept per booster"))],
        *[(f"strategy_best{p}{m}", r.get(f"strategy_best{p}{m}"), note) for p in ("", "_nested")
          for m, note in (("", "lowest OOF log loss" + (" (nested)" if p else "")),
                          ("_margin_vs_next", "OOF log loss gap to the runner-up"),
                          ("_folds_won", "folds where it beats the runner-up"))],
        ("bench_seconds", r["bench_seconds"], ""),
    ]


if __name__ == "__main__":
    main()
