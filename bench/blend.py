"""Ensemble benchmark: what the fully nested ``auto`` blend costs at the competition's sizes.

Run: ``python -m bench.blend [--clips 20000 200000] [--models 2 4] [--repeats 1]``. On synthetic out-of-fold
predictions (80 % of the clips are training rows, 24 classes at the competition's rarity, each model a noisy view
of the same logits, 5 folds) it times, in one run and alternating:
- ``chosen_on_all_folds_s``: what the ensemble stage did before: every method's nested scores, the winner refitted
  on every row, and the winner's nested predictions as the reported blend (its choice saw every fold);
- ``fully_nested_s``: what it does now (:func:`jungletrap.ensemble.fit_blend` with ``auto``): the same plus, per
  fold, the method chosen on the other folds' own nested scores (an inner nested loop);
and each method's single fit (``fit_s``). ``fully_nested_over_before`` is the ratio (expected ~4-5: 21 fits of
each method become ~100). Times are medians of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import numpy as np

from bench.common import print_table, update_results
from jungletrap.blenders import (
    BLEND_METHODS,
    best_method,
    fit_blender,
    fit_clipped_blender,
    nested_predictions,
    nested_scores,
)
from jungletrap.config import JobConfig
from jungletrap.ensemble import fit_blend

#: Class rates like the competition's: a few common classes, most under 1 %.
CLASS_RATES = np.geomspace(0.3, 0.001, 24)


def synthetic_oof(n_train: int, n_models: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Labels, ``n_models`` probability arrays (each the true logit plus its own noise) and 5 folds."""
    rng = np.random.default_rng(seed)
    logit = np.log(CLASS_RATES / (1 - CLASS_RATES))[None] + rng.normal(0, 2, (n_train, 24))
    truth = (rng.random(logit.shape) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    models = [1 / (1 + np.exp(-(logit + rng.normal(0, 1 + 0.25 * m, logit.shape)))) for m in range(n_models)]
    return truth, models, np.arange(n_train) % 5


def chosen_on_all_folds(truth: np.ndarray, oof: list[np.ndarray], folds: np.ndarray) -> np.ndarray:
    scores = nested_scores(truth, oof, folds, clip="auto")
    method = best_method(scores)
    fit_clipped_blender(method, truth, oof, "auto")
    return nested_predictions(method, truth, oof, folds, clip="auto")


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--models", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = JobConfig()  # ensemble.method auto, clip auto
    result: dict[str, Any] = {}
    rows = []
    for clips in args.clips:
        for n_models in args.models:
            truth, oof, folds = synthetic_oof(int(clips * 0.8), n_models)
            fit_s = {m: _seconds(functools.partial(fit_blender, m, truth, oof)) for m in BLEND_METHODS}
            before, after = [], []
            for _ in range(args.repeats):  # alternating, so other load falls on both alike
                before.append(_seconds(functools.partial(chosen_on_all_folds, truth, oof, folds)))
                after.append(_seconds(functools.partial(fit_blend, cfg, truth, oof, folds)))
            key = f"{clips}_clips_{n_models}_models"
            result[key] = {"train_rows": len(truth), "fit_s": fit_s,
                           "chosen_on_all_folds_s": statistics.median(before),
                           "fully_nested_s": statistics.median(after),
                           "fully_nested_over_before": statistics.median(after) / statistics.median(before)}
            rows += [(f"{key} before", result[key]["chosen_on_all_folds_s"], "s, method chosen on every fold"),
                     (f"{key} now", result[key]["fully_nested_s"], "s, fully nested auto"),
                     (f"{key} ratio", result[key]["fully_nested_over_before"], "now / before")]
            print_table("blend fitting", rows[-3:])
    update_results("blend", result)
    return result


if __name__ == "__main__":
    main()
