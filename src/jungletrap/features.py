"""Features stage: embedding parts → ``features/part-NNNNN.parquet``, one row per video, on the cluster.

One Dask task per embedding part reads it on a worker, maps it through
:func:`jungletrap.udfs.features.features_partition` (its output columns are declared by ``features_meta``) and
writes ``features/part-NNNNN.parquet`` atomically. A run with several backbones (``embed.backbones``) has one
embedding dataset per backbone, with the same parts holding the same clips in the same order: the task reads the
main backbone's part, then each other backbone's part of the same name in turn (one part's embeddings in memory
at a time), and adds its pooled columns (``emb_<backbone>_<stat>_<d>``,
:func:`jungletrap.udfs.features.pooled_prefix`); the main backbone keeps the single-backbone names. Then the
transforms learned from training rows only (:mod:`jungletrap.feature_fit`) are fitted on the client from those
rows and applied to every part by Dask
tasks. The stage is cheap next to embedding, so it is recomputed whole when its inputs change.

Within a run both kinds of task are idempotent (a part already written from the same embedding part and
settings, or already transformed by the same transform, is returned as it is) and each future is released once
its result is read: a worker lost mid-stage costs only the parts it had in flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client

from jungletrap.config import FeaturesConfig, config_hash
from jungletrap.embed import read_embedding_meta
from jungletrap.feature_fit import RELATIVE_FEATURES, FeatureTransform, apply_feature_transform, fit_medians, fit_pca
from jungletrap.schema import EMBEDDING, VIDEO_ID
from jungletrap.storage import RunPath, path_token, read_schema, read_table, write_parquet_atomic
from jungletrap.tasks import results_as_completed
from jungletrap.udfs.features import (
    FEATURE_SET_VERSION,
    features_meta,
    features_partition,
    pooled_names,
    pooled_partition,
    pooled_prefix,
)

__all__ = [
    "FEATURES_DIR",
    "FEATURE_TRANSFORM",
    "build_features",
    "embedding_parts",
    "features_part",
    "read_embedding_part",
    "read_features_meta",
    "transform_part",
]

#: One other backbone of a feature part: its name, its embedding part (same name as the main one's) and width.
OtherPart = tuple[str, RunPath, int]

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
FEATURE_TRANSFORM = Path("models") / "features.json"
META_KEY = b"jungletrap"


def read_features_meta(path: RunPath | str) -> dict[str, Any]:
    """The jungletrap key-value metadata of a feature part (feature-set version, pooling, sources...)."""
    meta = read_schema(path).metadata or {}
    return dict(json.loads(meta.get(META_KEY, b"{}")))


def _written_with(path: RunPath, expected: dict[str, Any]) -> bool:
    """True when ``path`` is a feature part whose metadata holds every item of ``expected``."""
    if not path.is_file():
        return False
    try:
        meta = read_features_meta(path)
    except (OSError, pa.ArrowInvalid, ValueError):
        return False
    return all(meta.get(k) == v for k, v in expected.items())


def _n_rows(path: RunPath) -> int:
    return read_table(path, columns=[VIDEO_ID]).num_rows


def embedding_parts(embed_dir: RunPath) -> list[RunPath]:
    parts = sorted(embed_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no embedding parts in {embed_dir}: run the embed stage first")
    return parts


def read_embedding_part(path: RunPath | str) -> pd.DataFrame:
    """Read one embedding part as pandas, each embedding a flat numpy array (zero-copy slices of one buffer)."""
    table = read_table(path)
    frame = table.drop_columns([EMBEDDING]).to_pandas()
    column = table.column(EMBEDDING).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    frame[EMBEDDING] = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    return frame


def _fit_frame(parts: list[RunPath], fit_ids: set[str], columns: list[str], sample_ids: set[str] | None
               ) -> pd.DataFrame:
    """The training rows' columns needed to fit the transform, read part by part on the client."""
    wanted = fit_ids if sample_ids is None else sample_ids
    frames = []
    for path in parts:
        frame = read_table(path, columns=[VIDEO_ID, *columns]).to_pandas()
        # Look each of the part's ids up in the set: Series.isin(set) converts the whole set on every call, which
        # made this loop parts x N (over 15 minutes at 200,000 clips), not N.
        keep = np.fromiter((v in wanted for v in frame[VIDEO_ID]), dtype=bool, count=len(frame))
        frames.append(frame[keep])
    return pd.concat(frames, ignore_index=True)


def _fit_transform(parts: list[RunPath], fit_ids: set[str], cfg: FeaturesConfig, seed: int,
                   pooled: Mapping[str | None, list[str]]) -> FeatureTransform:
    """Fit on the training rows: the resolution medians, then one PCA per backbone (``pooled``: backbone, None
    for the main one, to its pooled columns), each from the same seeded sample of at most ``pca_max_rows``
    training rows, read one backbone's columns at a time (memory: ``pca_max_rows`` x one backbone's columns)."""
    base = ["width", "height", *RELATIVE_FEATURES.values()]
    transform = FeatureTransform(fit_medians(_fit_frame(parts, fit_ids, base, None)))
    if cfg.pca_components > 0:
        ids = sorted(fit_ids)
        rng = np.random.default_rng(seed)
        sample = set(rng.choice(ids, min(len(ids), cfg.pca_max_rows), replace=False).tolist())
        for backbone, columns in pooled.items():
            transform.pca.append(fit_pca(_fit_frame(parts, fit_ids, columns, sample), columns,
                                         prefix=pooled_prefix(backbone), n_components=cfg.pca_components,
                                         max_rows=cfg.pca_max_rows, seed=seed))
    return transform


def transform_part(path: RunPath, transform: FeatureTransform, transform_hash: str = "") -> int:
    """Dask task: add the fitted columns to one feature part, rewriting it atomically; return its rows.

    Idempotent: a part already transformed by ``transform_hash`` (the task ran again) is left as it is.
    """
    if transform_hash and _written_with(path, {"transform": transform_hash}):
        return _n_rows(path)
    table = read_table(path)
    frame = apply_feature_transform(table.to_pandas(), transform)
    metadata = dict(table.schema.metadata or {})
    if transform_hash:
        metadata[META_KEY] = json.dumps({**json.loads(metadata.get(META_KEY, b"{}")),
                                         "transform": transform_hash}).encode()
    out = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(metadata)
    write_parquet_atomic(out, path)
    return len(frame)


def _source(embed_path: RunPath) -> dict[str, Any]:
    meta = read_embedding_meta(embed_path)
    return {k: meta.get(k) for k in ("result_hash", "rows_hash", "n_rows")}


def _other_pooled(frame: pd.DataFrame, other: OtherPart, pooling: list[str], main_path: RunPath) -> pd.DataFrame:
    """One other backbone's pooled columns for ``frame``'s clips, refused unless its part has the same rows."""
    backbone, path, dim = other
    part = read_embedding_part(path)
    if part[VIDEO_ID].tolist() != frame[VIDEO_ID].tolist():
        raise RuntimeError(f"{path} does not hold the clips of {main_path} in the same order: the backbones' "
                           "embeddings are out of step; run the embed stage again")
    return pooled_partition(part, embed_dim=dim, pooling=pooling, backbone=backbone)


def features_part(embed_path: RunPath, out_path: RunPath, others: list[OtherPart] | None = None, *, embed_dim: int,
                  pooling: list[str], metadata: dict[bytes, bytes]) -> int:
    """Dask task: one embedding part (one per backbone) → one feature part (written atomically); return its rows.

    ``embed_path`` is the main backbone's part; ``others`` the other backbones' parts of the same name, read one
    after another (one part's embeddings in memory at a time) for their pooled columns.
    The part's metadata is ``metadata`` plus the identity of the embedding parts it was made from; a part
    already written with that metadata (the task ran again after its worker died) is returned, not rewritten.
    Plain pandas in the task (not a Dask DataFrame) keeps the per-video embedding arrays as numpy objects:
    Dask's string conversion of object columns would otherwise turn them into text.
    """
    others = others or []
    info = {**json.loads(metadata[META_KEY]), "source": _source(embed_path)}
    if others:
        info["other_sources"] = {b: _source(path) for b, path, _ in others}
    if _written_with(out_path, info):
        return _n_rows(out_path)
    frame = features_partition(read_embedding_part(embed_path), embed_dim=embed_dim, pooling=pooling)
    if others:
        frame = pd.concat([frame, *(_other_pooled(frame, o, pooling, embed_path) for o in others)], axis=1)
    declared = list(features_meta(embed_dim, pooling, {b: dim for b, _, dim in others}).columns)
    if list(frame.columns) != declared:
        raise RuntimeError(f"features UDF returned columns that differ from its declared schema ({embed_path})")
    table = pa.Table.from_pandas(frame, schema=_schema(frame), preserve_index=False)
    write_parquet_atomic(table.replace_schema_metadata({**metadata, META_KEY: json.dumps(info).encode()}), out_path)
    return len(frame)


def _schema(frame: pd.DataFrame) -> pa.Schema:
    text = {VIDEO_ID, "status", "error"}
    return pa.schema([pa.field(c, pa.string() if c in text else pa.float32()) for c in frame.columns])


def _other_backbones(parts: list[RunPath], embed_dirs: list[tuple[str, RunPath]]) -> dict[str, dict[str, Any]]:
    """Each other backbone's width and result hash, once its parts are checked to be the main one's parts."""
    names = [p.name for p in parts]
    others: dict[str, dict[str, Any]] = {}
    for backbone, directory in embed_dirs:
        theirs = embedding_parts(directory)
        if [p.name for p in theirs] != names:
            raise FileNotFoundError(f"{directory} has parts {[p.name for p in theirs][:5]}..., the main backbone's "
                                    f"{parts[0].parent} has {names[:5]}...: every backbone must be embedded "
                                    "into the same parts; run the embed stage again")
        meta = read_embedding_meta(theirs[0])
        if meta.get("backbone") != backbone:
            raise ValueError(f"{directory}: its parts were made by backbone {meta.get('backbone')!r}, not {backbone!r}")
        others[backbone] = {"embed_dim": int(meta["feature_dim"]), "embed_result_hash": meta.get("result_hash")}
    return others


def build_features(client: Client, embed_dirs: RunPath | Mapping[str, RunPath], out_dir: RunPath,
                   cfg: FeaturesConfig, *, transform_path: RunPath,
                   fit_ids: set[str] | None = None, seed: int = 0) -> dict[str, int]:
    """Write the feature table for every embedding part; return row counts.

    ``embed_dirs``: each backbone's embedding dataset, the main backbone first (``train.embed_dirs``); a single
    directory is a run with one backbone. The part metadata records the other backbones (``other_backbones``:
    name → ``embed_dim``, ``embed_result_hash``; absent with one backbone).
    With ``fit_ids`` (the training clips) the fitted transform is learned from those rows and saved to
    ``transform_path``; without, the transform saved there by the run is loaded and applied (predict).
    """
    dirs = list(embed_dirs.items()) if isinstance(embed_dirs, Mapping) else [("", embed_dirs)]
    parts = embedding_parts(dirs[0][1])
    embed_meta = read_embedding_meta(parts[0])
    embed_dim = int(embed_meta["feature_dim"])
    others = _other_backbones(parts, dirs[1:])
    settings = {"artifact": "features", "feature_set_version": FEATURE_SET_VERSION, "embed_dim": embed_dim,
                "pooling": list(cfg.pooling), "pca_components": cfg.pca_components,
                "embed_result_hash": embed_meta.get("result_hash")}
    if others:
        settings["other_backbones"] = others
    custom = {META_KEY: json.dumps(settings).encode()}
    if out_dir.exists():
        for stale in out_dir.glob("part-*.parquet"):
            stale.unlink()
    token = path_token(out_dir)
    other_parts = [[(b, d / p.name, others[b]["embed_dim"]) for b, d in dirs[1:]] for p in parts]
    futures = client.map(features_part, parts, [out_dir / p.name for p in parts], other_parts,
                         embed_dim=embed_dim, pooling=list(cfg.pooling), metadata=custom,
                         key=[f"features-{p.stem}-{token}" for p in parts], pure=False)
    for _ in results_as_completed(client, futures):
        pass
    feature_parts = sorted(out_dir.glob("part-*.parquet"))
    if fit_ids is not None:
        pooled: dict[str | None, list[str]] = {None: pooled_names(embed_dim, cfg.pooling)}
        pooled.update({b: pooled_names(o["embed_dim"], cfg.pooling, b) for b, o in others.items()})
        transform = _fit_transform(feature_parts, fit_ids, cfg, seed, pooled)
        transform.save(transform_path)
    else:
        transform = FeatureTransform.load(transform_path)
    transform_hash = config_hash(asdict(transform))
    rows = list(results_as_completed(client, client.map(
        transform_part, feature_parts, transform=transform, transform_hash=transform_hash,
        key=[f"features-transform-{p.stem}-{token}" for p in feature_parts], pure=False)))
    n_columns = len(read_schema(feature_parts[0]).names) if feature_parts else 0
    log.info("features: %d rows, %d columns (%d backbone(s): %d pooled dims x %s; %d PCA)", sum(rows), n_columns,
             1 + len(others), embed_dim + sum(o["embed_dim"] for o in others.values()), list(cfg.pooling),
             sum(len(p.components) for p in transform.pca))
    return {"rows": int(sum(rows)), "columns": n_columns}
