"""The competition metric against scikit-learn, and the prior baseline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from jungletrap.metrics import fold_prior_predictions, mean_log_loss, per_class_auc, top1_accuracy


def test_mean_log_loss_equals_sklearn_per_column_mean() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 24)) < 0.2).astype(int)
    y[0] = 1  # every column has both labels
    y[1] = 0
    p = rng.random((200, 24))
    expected = np.mean([log_loss(y[:, c], p[:, c], labels=[0, 1]) for c in range(24)])
    assert mean_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_clipping_keeps_certain_mistakes_finite() -> None:
    y = np.array([[1, 0], [0, 1]])
    p = np.array([[0.0, 1.0], [1.0, 0.0]])
    value = mean_log_loss(y, p)
    assert np.isfinite(value) and value == pytest.approx(-np.log(1e-15), rel=1e-4)


def test_prior_baseline_is_out_of_fold() -> None:
    y = np.array([[1], [1], [0], [0]], dtype=float)
    folds = np.array([0, 0, 1, 1])
    prior = fold_prior_predictions(y, folds)
    assert prior[:2, 0].tolist() == [0.0, 0.0] and prior[2:, 0].tolist() == [1.0, 1.0]


def test_auc_nan_for_single_label_columns_and_top1() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]])
    auc = per_class_auc(y, p)
    assert auc[0] == 1.0 and np.isnan(auc[1])
    assert top1_accuracy(y, p) == pytest.approx(2 / 3)
