"""Feature transforms learned from data: fitted on training rows only, applied to every row (fit vs transform).

- **Resolution-relative container features**: the same file size means different things at 360p and 720p, so
  ``bytes_per_second_rel``, ``bytes_per_pixel_rel`` and ``size_bytes_rel`` divide by the training median of
  the clip's resolution group (``width x height``; unseen groups use the global training median).
- **PCA of the pooled embeddings** (``features.pca_components`` > 0), one per backbone: ``emb_pca_<k>`` for the
  main backbone's pooled columns, ``emb_<backbone>_pca_<k>`` for each other backbone's, each fitted with
  scikit-learn on at most ``features.pca_max_rows`` training rows (a seeded sample), to keep the width sane. A PCA
  per backbone, not one over all of them: each backbone's components stay its own, and the fit reads one
  backbone's columns at a time.
The fitted parameters are saved as JSON (``models/features.json``) and ``predict`` applies them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from jungletrap.storage import RunPath, write_text_atomic

__all__ = ["FeatureTransform", "PcaFit", "fit_feature_transform", "fit_pca", "apply_feature_transform",
           "RELATIVE_FEATURES"]

RELATIVE_FEATURES: dict[str, str] = {
    "size_bytes_rel": "size_bytes",
    "bytes_per_second_rel": "bytes_per_second",
    "bytes_per_pixel_rel": "bytes_per_pixel",
}
_GLOBAL = "*"


@dataclass
class PcaFit:
    """One fitted PCA: ``columns`` (centred by ``mean``) projected on ``components`` → ``<prefix>pca_<k:03d>``."""

    prefix: str
    columns: list[str]
    mean: list[float]
    components: list[list[float]]

    def output_names(self) -> list[str]:
        return [f"{self.prefix}pca_{k:03d}" for k in range(len(self.components))]


@dataclass
class FeatureTransform:
    """Everything learned from the training rows; JSON round-trips exactly. ``pca``: one fit per backbone."""

    group_medians: dict[str, dict[str, float]]
    pca: list[PcaFit] = field(default_factory=list)

    def save(self, path: RunPath) -> None:
        write_text_atomic(json.dumps(asdict(self)), path)

    @classmethod
    def load(cls, path: RunPath) -> FeatureTransform:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureTransform:
        """From :meth:`save`'s JSON; also reads the single-PCA layout runs wrote before one PCA per backbone."""
        if "pca_columns" in data:
            legacy = [PcaFit("emb_", data["pca_columns"], data["pca_mean"], data["pca_components"])]
            return cls(data["group_medians"], legacy if data["pca_components"] else [])
        return cls(data["group_medians"], [PcaFit(**p) for p in data.get("pca", [])])


def _group(frame: pd.DataFrame) -> pd.Series:
    w = frame["width"].fillna(-1).astype(int).astype(str)
    h = frame["height"].fillna(-1).astype(int).astype(str)
    return w + "x" + h


def fit_medians(train: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per-resolution (and global) training medians of the relative features' sources."""
    sources = list(RELATIVE_FEATURES.values())
    medians = {g: rows[sources].median().to_dict() for g, rows in train.groupby(_group(train))}
    medians[_GLOBAL] = train[sources].median().to_dict()
    return {g: {k: float(v) for k, v in m.items() if pd.notna(v) and v > 0} for g, m in medians.items()}


def fit_pca(train: pd.DataFrame, columns: list[str], *, prefix: str, n_components: int, max_rows: int,
            seed: int) -> PcaFit:
    """A PCA of ``columns`` over the training rows whose values are all finite (at most ``max_rows``, sampled)."""
    x = train[columns].to_numpy(np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    k = min(n_components, len(x), len(columns))
    pca = PCA(n_components=k, svd_solver="full" if max(x.shape) < 500 else "randomized", random_state=seed).fit(x)
    return PcaFit(prefix, list(columns), pca.mean_.tolist(), pca.components_.tolist())


def fit_feature_transform(train: pd.DataFrame, *, pca_columns: Mapping[str, list[str]], pca_components: int,
                          max_rows: int, seed: int) -> FeatureTransform:
    """Fit on training rows only: per-resolution medians and (optionally) one PCA per entry of ``pca_columns``
    (output prefix, e.g. ``emb_`` → ``emb_pca_<k>``, to the pooled columns it reduces)."""
    if pca_components <= 0:
        return FeatureTransform(fit_medians(train))
    return FeatureTransform(fit_medians(train), [
        fit_pca(train, columns, prefix=prefix, n_components=pca_components, max_rows=max_rows, seed=seed)
        for prefix, columns in pca_columns.items() if columns])


def apply_feature_transform(frame: pd.DataFrame, transform: FeatureTransform) -> pd.DataFrame:
    """Add the relative container features and the PCA columns (NaN where inputs are NaN)."""
    out = frame.copy()
    groups = _group(frame)
    fallback = transform.group_medians.get(_GLOBAL, {})
    for name, source in RELATIVE_FEATURES.items():
        median = groups.map(lambda g, s=source: transform.group_medians.get(g, fallback).get(s, fallback.get(s)))
        out[name] = (frame[source] / pd.to_numeric(median, errors="coerce")).astype(np.float32)
    for pca in transform.pca:
        x = frame[pca.columns].to_numpy(np.float64) - np.asarray(pca.mean)
        proj = (x @ np.asarray(pca.components).T).astype(np.float32)  # NaN rows (error clips) stay NaN
        for k, name in enumerate(pca.output_names()):
            out[name] = proj[:, k]
    return out
