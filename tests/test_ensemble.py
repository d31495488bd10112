"""Ensemble: weights fitted on OOF never lose to the best model; the submission follows the format file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jungletrap.blenders import BLEND_METHODS, nested_predictions
from jungletrap.ensemble import blend, choose_clip, fit_weights, write_submission
from jungletrap.metrics import mean_log_loss
from jungletrap.schema import CLASS_NAMES, FILENAME


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((300, 24)) < 0.15).astype(float)
    good = np.clip(0.7 * y + 0.15 + rng.normal(0, 0.1, y.shape), 0.01, 0.99)
    weak = np.clip(0.3 * y + 0.2 + rng.normal(0, 0.2, y.shape), 0.01, 0.99)
    return y, good, weak


def test_fitted_weights_beat_each_model_and_favour_the_better_one() -> None:
    y, good, weak = _problem()
    w = fit_weights(y, [weak, good])
    assert w.sum() == pytest.approx(1) and (w >= 0).all() and w[1] > w[0]
    blended = np.tensordot(w, np.stack([weak, good]), axes=1)
    assert mean_log_loss(y, blended) <= min(mean_log_loss(y, good), mean_log_loss(y, weak)) + 1e-9


def test_blend_aligns_on_video_id() -> None:
    a = pd.DataFrame(np.full((2, 24), 0.2), index=["v1", "v2"], columns=list(CLASS_NAMES))
    b = pd.DataFrame(np.full((2, 24), 0.6), index=["v2", "v1"], columns=list(CLASS_NAMES))
    b.loc["v1"] = 0.4
    out = blend([a, b], np.array([0.5, 0.5]))
    assert out.loc["v1"].iloc[0] == pytest.approx(0.3) and out.loc["v2"].iloc[0] == pytest.approx(0.4)


def test_auto_clip_picks_a_candidate_that_helps_overconfident_models() -> None:
    y, good, _ = _problem(1)
    overconfident = np.where(good > 0.5, 1.0, 0.0)
    assert choose_clip(y, overconfident, "auto") > 0
    assert choose_clip(y, good, 0.002) == 0.002


def test_submission_follows_the_format_file_order(tmp_path: Path) -> None:
    names = [f"clip_{i}.mp4" for i in range(5)]
    fmt = pd.DataFrame({FILENAME: names[::-1], **{c: 0.5 for c in CLASS_NAMES}})
    fmt.to_csv(tmp_path / "fmt.csv", index=False)
    test = pd.DataFrame(np.arange(5 * 24).reshape(5, 24) / 1000, index=names, columns=list(CLASS_NAMES))
    sub = write_submission(test, tmp_path / "fmt.csv", tmp_path / "submission.csv")
    written = pd.read_csv(tmp_path / "submission.csv")
    assert list(written.columns) == [FILENAME, *CLASS_NAMES]
    assert written[FILENAME].tolist() == names[::-1]
    np.testing.assert_allclose(written.set_index(FILENAME).loc[names].to_numpy(), test.to_numpy(), atol=1e-6)
    assert len(sub) == 5


def test_submission_refuses_missing_predictions(tmp_path: Path) -> None:
    fmt = pd.DataFrame({FILENAME: ["a.mp4", "b.mp4"], **{c: 0.5 for c in CLASS_NAMES}})
    fmt.to_csv(tmp_path / "fmt.csv", index=False)
    test = pd.DataFrame(np.full((1, 24), 0.1), index=["a.mp4"], columns=list(CLASS_NAMES))
    with pytest.raises(ValueError, match="b.mp4"):
        write_submission(test, tmp_path / "fmt.csv", tmp_path / "submission.csv")


def test_stacker_learns_to_trust_the_better_model() -> None:
    from jungletrap.blenders import fit_blender, nested_scores

    y, good, weak = _problem(2)
    params = fit_blender("stacker", y, [weak, good])
    coef = np.asarray(params["coef"])
    assert coef.shape == (24, 2) and (coef[:, 1] > coef[:, 0]).mean() > 0.8
    folds = np.arange(len(y)) % 5
    scores = nested_scores(y, [weak, good], folds)
    assert set(scores) == set(BLEND_METHODS)
    assert scores["weights"] < scores["mean"]  # the weak model drags the plain mean down


@pytest.mark.parametrize("method", BLEND_METHODS)
def test_a_folds_nested_blend_and_clip_never_see_its_labels(method: str) -> None:
    """Flipping every label of fold 0 must leave fold 0's nested blend (clip included) exactly as it was.

    A blender or a clip fitted with fold 0's rows would move: overconfident 0/1 predictions make the clip choice
    depend on the labels (the flipped fold wants the largest clip). Before, the clip was chosen on every row.
    """
    y, good, weak = _problem(4)
    overconfident = np.where(good > 0.5, 1.0, 0.0)
    folds = np.arange(len(y)) % 5
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    nested, again = (nested_predictions(method, truth, [weak, overconfident], folds, clip="auto")
                     for truth in (y, flipped))
    np.testing.assert_array_equal(nested[folds == 0], again[folds == 0])
    assert not np.array_equal(nested[folds == 1], again[folds == 1])  # the other folds' blend and clip do see them
    assert np.array_equal(nested_predictions(method, y, [weak, overconfident], folds, clip=0.01),
                          np.clip(nested_predictions(method, y, [weak, overconfident], folds), 0.01, 0.99))


def test_stacker_handles_a_class_with_no_positives() -> None:
    from jungletrap.blenders import apply_blender, fit_blender

    y, good, weak = _problem(3)
    y[:, 5] = 0
    out = apply_blender(fit_blender("stacker", y, [weak, good]), [weak, good])
    assert np.isfinite(out).all() and out[:, 5].max() < 1e-3


def test_shared_stacker_recalibrates_underconfident_models_with_one_coefficient_each() -> None:
    """Two models whose logits are both half the truth's: a weighted mean cannot sharpen them, the shared
    stacker's coefficients (summing to ~2) can, with M+1 numbers for all 24 classes."""
    from jungletrap.blenders import apply_blender, fit_blender

    rng = np.random.default_rng(5)
    z = rng.normal(-2, 2, (400, 24))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    a, b = (1 / (1 + np.exp(-(z + rng.normal(0, 0.3, z.shape)) / 2)) for _ in range(2))
    params = fit_blender("shared_stacker", y, [a, b])
    assert len(params["coef"]) == 2 and isinstance(params["intercept"], float)
    assert 1.5 < sum(params["coef"]) < 2.5
    shared = mean_log_loss(y, apply_blender(params, [a, b]))
    weighted = mean_log_loss(y, apply_blender(fit_blender("weights", y, [a, b]), [a, b]))
    assert shared < weighted - 0.01


def test_auto_reported_blend_chooses_each_folds_method_without_its_labels() -> None:
    """``auto``'s reported blend: flipping fold 0's labels must leave fold 0's predictions exactly as they were,
    method choice included (it is made on the other folds' nested scores), while the other folds move."""
    from jungletrap.blenders import nested_auto_predictions

    y, good, weak = _problem(6)
    folds = np.arange(len(y)) % 5
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    (nested, methods), (again, _) = (nested_auto_predictions(truth, [weak, good], folds, clip="auto")
                                     for truth in (y, flipped))
    np.testing.assert_array_equal(nested[folds == 0], again[folds == 0])
    assert not np.array_equal(nested[folds == 1], again[folds == 1])
    assert set(methods) == {0, 1, 2, 3, 4} and set(methods.values()) <= set(BLEND_METHODS)


def test_auto_with_two_folds_blends_each_by_the_mean() -> None:
    """Two folds leave one other fold, nothing to nest a method choice on: the plain mean, not a crash (a run
    whose clips fell into two folds failed with a zero-size reduction)."""
    from jungletrap.blenders import nested_auto_predictions, nested_predictions

    y, good, weak = _problem(7)
    folds = np.arange(len(y)) % 2
    nested, methods = nested_auto_predictions(y, [weak, good], folds, clip="auto")
    assert methods == {0: "mean", 1: "mean"}
    np.testing.assert_array_equal(nested, nested_predictions("mean", y, [weak, good], folds, clip="auto"))
