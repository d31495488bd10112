"""The inner early-stopping split: rows of a fold's training part set aside to choose when to stop.

A model that stops early on the fold it is then scored on picks its stopping point on those very rows, so its
out-of-fold score is optimistic. Every fold's models (XGBoost and the head) therefore fit on the training folds
minus a small inner split and stop on that split; the held-out fold is only predicted.

The split depends on the clips, not on row order: each clip gets a seeded hash of its ``video_id``, and within
each stratum (the clip's rarest positive class among the fit rows, or "no label") the clips with the lowest hashes
are taken, ``fraction`` of the stratum rounded. So XGBoost (rows in feature-part order) and the head (catalog
order) stop on exactly the same clips, rare classes reach the stopping rows in proportion, and it is O(N) numpy.

A refit (``train.refit``) then trains the fold's model again on all its training rows (fit + stopping) for the
count of rounds or epochs the stopping run chose (:func:`refit_count`), so the model sees every training clip
and the held-out fold still influences nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["refit_count", "stopping_mask"]

_NO_LABEL = -1


def _strata(labels: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Each row's rarest positive class (rarity counted on the fit rows), or ``_NO_LABEL``."""
    counts = labels[fit].sum(axis=0).astype(np.float64)
    counts[counts == 0] = np.inf  # a class absent from the fit rows cannot define a stratum there
    rarity = np.where(labels > 0, counts[None, :], np.inf)
    rarest = rarity.argmin(axis=1)
    return np.where(np.isfinite(rarity.min(axis=1)), rarest, _NO_LABEL)


def stopping_mask(video_ids: np.ndarray, labels: np.ndarray, fit: np.ndarray, *, fraction: float,
                  seed: int) -> np.ndarray:
    """Boolean mask of the fit rows kept for early stopping (about ``fraction`` of them, at least one).

    ``video_ids``, ``labels`` (N, C) 0/1 and ``fit`` (N,) bool are aligned by row; the result is a subset of ``fit``
    and never all of it, whatever the row order (see the module docstring).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"early-stopping fraction must be in (0, 1), got {fraction}")
    fit = np.asarray(fit, dtype=bool)
    if fit.sum() < 2:
        raise ValueError(f"{int(fit.sum())} fit rows cannot be split into fit and early-stopping rows")
    key = f"{seed % 10**16:016d}"
    order = pd.util.hash_array(np.asarray(video_ids, dtype=object), hash_key=key).astype(np.float64)
    frame = pd.DataFrame({"stratum": _strata(np.asarray(labels), fit), "hash": order})[fit]
    rank = frame.groupby("stratum")["hash"].rank(method="first")
    size = frame.groupby("stratum")["hash"].transform("size")
    chosen = rank <= np.round(fraction * size)
    stop = np.zeros(len(fit), dtype=bool)
    stop[frame.index[chosen.to_numpy()]] = True
    if not stop.any():  # a tiny fit set rounds every stratum to zero: take the lowest hash
        stop[frame["hash"].idxmin()] = True
    if stop.sum() == fit.sum():
        stop[frame["hash"].idxmax()] = False
    return stop


def refit_count(chosen: int, *, fraction: float, scale: bool) -> int:
    """Rounds/epochs of the refit on all training rows: the stopping run's ``chosen`` count, or (``scale``) that
    count times 1 / (1 - ``fraction``), the usual heuristic that a set that much larger supports that many more
    steps before it overfits (for the head, an epoch over the larger set already takes that many more steps)."""
    if chosen < 1:
        raise ValueError(f"the stopping run chose {chosen} rounds/epochs; a refit needs at least 1")
    return max(1, round(chosen / (1 - fraction))) if scale else chosen
