"""Feature transforms learned from data: fitted on training rows only, applied to every row (fit vs transform).

- **Resolution-relative container features**: the same file size means different things at 360p and 720p, so
  ``bytes_per_second_rel``, ``bytes_per_pixel_rel`` and ``size_bytes_rel`` divide by the training median of
  the clip's resolution group (``width x height``; unseen groups use the global training median).
- **PCA of the pooled embeddings** (``features.pca_components`` > 0): ``emb_pca_<k>`` columns, fitted with
  scikit-learn on at most ``features.pca_max_rows`` training rows (a seeded sample), to keep the width sane.
The fitted parameters are saved as JSON (``models/features.json``) and ``predict`` applies them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from jungletrap.storage import RunPath, write_text_atomic

__all__ = ["FeatureTransform", "fit_feature_transform", "apply_feature_transform", "RELATIVE_FEATURES"]

RELATIVE_FEATURES: dict[str, str] = {
    "size_bytes_rel": "size_bytes",
    "bytes_per_second_rel": "bytes_per_second",
    "bytes_per_pixel_rel": "bytes_per_pixel",
}
_GLOBAL = "*"


@dataclass
class FeatureTransform:
    """Everything learned from the training rows; JSON round-trips exactly."""

    group_medians: dict[str, dict[str, float]]
    pca_columns: list[str]
    pca_mean: list[float]
    pca_components: list[list[float]]

    def save(self, path: RunPath) -> None:
        write_text_atomic(json.dumps(asdict(self)), path)

    @classmethod
    def load(cls, path: RunPath) -> FeatureTransform:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _group(frame: pd.DataFrame) -> pd.Series:
    w = frame["width"].fillna(-1).astype(int).astype(str)
    h = frame["height"].fillna(-1).astype(int).astype(str)
    return w + "x" + h


def fit_feature_transform(train: pd.DataFrame, *, pca_columns: list[str], pca_components: int, max_rows: int,
                          seed: int) -> FeatureTransform:
    """Fit on training rows only: per-resolution medians and (optionally) a PCA of ``pca_columns``."""
    sources = list(RELATIVE_FEATURES.values())
    medians = {g: rows[sources].median().to_dict() for g, rows in train.groupby(_group(train))}
    medians[_GLOBAL] = train[sources].median().to_dict()
    clean = {g: {k: float(v) for k, v in m.items() if pd.notna(v) and v > 0} for g, m in medians.items()}
    if pca_components <= 0 or not pca_columns:
        return FeatureTransform(clean, [], [], [])
    x = train[pca_columns].to_numpy(np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    k = min(pca_components, len(x), len(pca_columns))
    pca = PCA(n_components=k, svd_solver="full" if max(x.shape) < 500 else "randomized", random_state=seed).fit(x)
    return FeatureTransform(clean, list(pca_columns), pca.mean_.tolist(), pca.components_.tolist())


def apply_feature_transform(frame: pd.DataFrame, transform: FeatureTransform) -> pd.DataFrame:
    """Add the relative container features and the PCA columns (NaN where inputs are NaN)."""
    out = frame.copy()
    groups = _group(frame)
    fallback = transform.group_medians.get(_GLOBAL, {})
    for name, source in RELATIVE_FEATURES.items():
        median = groups.map(lambda g, s=source: transform.group_medians.get(g, fallback).get(s, fallback.get(s)))
        out[name] = (frame[source] / pd.to_numeric(median, errors="coerce")).astype(np.float32)
    if transform.pca_components:
        comps = np.asarray(transform.pca_components)
        x = frame[transform.pca_columns].to_numpy(np.float64) - np.asarray(transform.pca_mean)
        proj = (x @ comps.T).astype(np.float32)  # NaN rows (error clips) stay NaN
        for k in range(comps.shape[0]):
            out[f"emb_pca_{k:03d}"] = proj[:, k]
    return out
