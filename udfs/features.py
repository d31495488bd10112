"""Features UDF: an embedding partition in, one feature row per video out.

Column groups (names are stable; see the README):
- container: ``size_bytes``, ``bit_rate``, ``width``, ``height``, ``aspect``, ``fps``, ``duration_s``,
  ``declared_frames``, ``decoded_frames``, ``has_audio``, ``bytes_per_second``, ``bytes_per_pixel``;
- pixel and motion: the embed UDF's ``brightness_mean``, ``saturation_mean``, ``motion_*``;
- temporal pooling of the frame embeddings: ``emb_<stat>_<dim>`` for each configured statistic (the main
  backbone), ``emb_<backbone>_<stat>_<dim>`` for each other backbone of a run (:func:`pooled_prefix`).
Error rows keep their row with NaN features (XGBoost and the head both accept NaN).

With several backbones the container and pixel columns come from the main backbone's part (the others' parts
have the same rows; their pixel statistics, computed at their own input size, may differ slightly) and each
other backbone adds only its pooled columns (:func:`pooled_partition`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from jungletrap.schema import (
    EMBEDDING,
    ERROR,
    N_FRAMES,
    PIXEL_COLUMNS,
    SIZE_BYTES,
    STATUS,
    STATUS_OK,
    VIDEO_ID,
)

__all__ = ["FEATURE_SET_VERSION", "CONTAINER_FEATURES", "features_meta", "features_partition", "pooled_names",
           "pooled_partition", "pooled_prefix"]

FEATURE_SET_VERSION = "2"

CONTAINER_FEATURES: tuple[str, ...] = (
    SIZE_BYTES,
    "bit_rate",
    "width",
    "height",
    "aspect",
    "fps",
    "duration_s",
    "declared_frames",
    "decoded_frames",
    "has_audio",
    "bytes_per_second",
    "bytes_per_pixel",
    N_FRAMES,
)

_POOLERS = {
    "mean": lambda x: x.mean(axis=0),
    "max": lambda x: x.max(axis=0),
    "min": lambda x: x.min(axis=0),
    "std": lambda x: x.std(axis=0),
    "maxmin": lambda x: x.max(axis=0) - x.min(axis=0),
    "p10": lambda x: np.percentile(x, 10, axis=0),
    "p50": lambda x: np.percentile(x, 50, axis=0),
    "p90": lambda x: np.percentile(x, 90, axis=0),
}


def pooled_prefix(backbone: str | None = None) -> str:
    """Prefix of a backbone's pooled (and PCA) columns: ``emb_`` for the main one (``None``), ``emb_<backbone>_``
    for another: a single-backbone run keeps its names, and a run's other backbones never collide with it."""
    return "emb_" if backbone is None else f"emb_{backbone}_"


def pooled_names(embed_dim: int, pooling: Sequence[str], backbone: str | None = None) -> list[str]:
    """The pooled columns of one backbone (``None``: the main one), statistic-major."""
    prefix = pooled_prefix(backbone)
    return [f"{prefix}{stat}_{d:04d}" for stat in pooling for d in range(embed_dim)]


def features_meta(embed_dim: int, pooling: Sequence[str], others: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Empty frame with the output columns and dtypes (the ``meta`` handed to ``map_partitions``): the main
    backbone's :func:`features_partition`, then each other backbone's pooled columns (``others``: name → width)."""
    cols: dict[str, pd.Series] = {name: pd.Series([], dtype="str") for name in (VIDEO_ID, STATUS, ERROR)}
    pooled = [n for b, dim in (others or {}).items() for n in pooled_names(dim, pooling, b)]
    for name in (*CONTAINER_FEATURES, *PIXEL_COLUMNS, *pooled_names(embed_dim, pooling), *pooled):
        cols[name] = pd.Series([], dtype=np.float32)
    return pd.DataFrame(cols)


def _container(part: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=part.index)
    for name in (SIZE_BYTES, "bit_rate", "width", "height", "fps", "duration_s", "declared_frames",
                 "decoded_frames", N_FRAMES):
        out[name] = pd.to_numeric(part[name], errors="coerce").astype(np.float64)
    out.loc[out[SIZE_BYTES] < 0, SIZE_BYTES] = np.nan
    out.loc[out["declared_frames"] < 0, "declared_frames"] = np.nan
    out["has_audio"] = part["has_audio"].map({True: 1.0, False: 0.0}).astype(np.float64)
    out["aspect"] = out["width"] / out["height"]
    out["bytes_per_second"] = out[SIZE_BYTES] / out["duration_s"].where(out["duration_s"] > 0)
    out["bytes_per_pixel"] = out[SIZE_BYTES] / (out["width"] * out["height"] * out["decoded_frames"]).where(
        out["decoded_frames"] > 0
    )
    return out[list(CONTAINER_FEATURES)]


def _pooled(part: pd.DataFrame, embed_dim: int, pooling: Sequence[str]) -> np.ndarray:
    out = np.full((len(part), embed_dim * len(pooling)), np.nan, dtype=np.float32)
    for i, (flat, n) in enumerate(zip(part[EMBEDDING], part[N_FRAMES], strict=True)):
        if n and n > 0 and flat is not None and len(flat) == n * embed_dim:
            frames = np.asarray(flat, dtype=np.float32).reshape(int(n), embed_dim)
            out[i] = np.concatenate([_POOLERS[stat](frames) for stat in pooling])
    return out


def features_partition(part: pd.DataFrame, *, embed_dim: int, pooling: Sequence[str]) -> pd.DataFrame:
    """Container facts, pixel/motion statistics and pooled embeddings of every video in ``part``."""
    base = pd.DataFrame({name: pd.Series(part[name].to_numpy(), dtype="str") for name in (VIDEO_ID, STATUS, ERROR)})
    container = _container(part).reset_index(drop=True).astype(np.float32)
    pixels = part[list(PIXEL_COLUMNS)].reset_index(drop=True).astype(np.float32)
    pooled = pd.DataFrame(_pooled(part, embed_dim, pooling), columns=pooled_names(embed_dim, pooling))
    ok = (base[STATUS] == STATUS_OK).to_numpy()
    pixels.loc[~ok] = np.nan
    return pd.concat([base, container, pixels, pooled], axis=1)


def pooled_partition(part: pd.DataFrame, *, embed_dim: int, pooling: Sequence[str], backbone: str) -> pd.DataFrame:
    """The pooled embeddings of another (not the main) backbone's part, one row per video in the part's order."""
    return pd.DataFrame(_pooled(part, embed_dim, pooling), columns=pooled_names(embed_dim, pooling, backbone))
