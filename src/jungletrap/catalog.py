"""Catalog stage: the competition CSVs + the videos root → ``catalog.parquet`` with splits, folds, partitions.

Every clip named in ``train_labels.csv`` (split ``train``) or ``submission_format.csv`` (split ``test``) gets a
row, whether or not its file exists: a missing file becomes an error row in the embed stage instead of being
dropped silently. Folds come from multi-label iterative stratification (``iterative-stratification``), so rare
classes are spread over the folds; the same folds serve every model.

The videos root (local path or fsspec URL) is listed once, recursively, with sizes (one paginated listing on
an object store, never a request per clip). A CSV filename is looked up relative to the root; a bare name not
found there is matched by file name anywhere below it (clips in nested folders), when that match is unique.
Partitions are contiguous runs of rows balanced by bytes (``catalog.partition_bytes``) and never longer than
``catalog.videos_per_partition`` clips, so one partition of long clips does not hold up the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from jungletrap.config import CatalogConfig, DataConfig
from jungletrap.schema import (
    CLASS_NAMES,
    FILENAME,
    FOLD,
    PARTITION,
    PATH,
    SIZE_BYTES,
    SPLIT,
    SPLIT_TEST,
    SPLIT_TRAIN,
    VIDEO_ID,
)
from jungletrap.storage import RunPath, as_location, join_location, list_files, read_csv, write_parquet_atomic

__all__ = [
    "CATALOG_NAME",
    "assign_folds",
    "assign_partitions",
    "build_catalog",
    "catalog_from_paths",
    "fold_masks",
    "read_competition_csv",
    "resolve_clips",
    "write_catalog",
]

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.parquet"


def read_competition_csv(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Read a labels or submission-format CSV (path or URL); check it has ``filename`` + the 24 classes in order."""
    frame = read_csv(path, storage_options, dtype={FILENAME: str})
    expected = [FILENAME, *CLASS_NAMES]
    if list(frame.columns) != expected:
        missing = [c for c in expected if c not in frame.columns]
        extra = [c for c in frame.columns if c not in expected]
        raise ValueError(
            f"{path}: columns must be filename + the 24 classes in competition order; "
            f"missing {missing}, unexpected {extra}"
        )
    if frame[FILENAME].duplicated().any():
        dup = frame.loc[frame[FILENAME].duplicated(), FILENAME].iloc[0]
        raise ValueError(f"{path}: filename {dup!r} is listed twice")
    return frame


def assign_folds(labels: np.ndarray, *, n_folds: int, seed: int) -> np.ndarray:
    """Multi-label stratified fold index for every row (rare classes spread across folds)."""
    if len(labels) < n_folds:
        raise ValueError(f"{len(labels)} training clips cannot fill catalog.n_folds={n_folds} folds")
    folds = np.full(len(labels), -1, dtype=np.int32)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels)):
        folds[held] = k
    return folds


def fold_masks(split: np.ndarray, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows a fold's model fits on and the rows it is validated on: disjoint, training split only.

    Every model (XGBoost and the head) takes its rows from here, so no model sees its own validation rows.
    """
    is_train = np.asarray(split) == SPLIT_TRAIN
    held = np.asarray(folds) == fold
    return is_train & ~held, is_train & held


def assign_partitions(size_bytes: np.ndarray, *, videos_per_partition: int,
                      partition_bytes: int | None) -> np.ndarray:
    """Partition index per row: contiguous, in row order, balanced by bytes and bounded by count.

    A partition closes when the next clip would take it over ``partition_bytes`` or it holds
    ``videos_per_partition`` clips; a clip larger than the target gets a partition to itself. Missing files
    (size -1) weigh nothing. Without a byte target (0 or None) partitions are by count only.
    """
    sizes = np.maximum(np.asarray(size_bytes, dtype=np.int64), 0)
    if not partition_bytes:
        return (np.arange(len(sizes)) // videos_per_partition).astype(np.int32)
    out = np.empty(len(sizes), dtype=np.int32)
    part, count, total = 0, 0, 0
    for i, size in enumerate(sizes.tolist()):
        if count and (count >= videos_per_partition or total + size > partition_bytes):
            part, count, total = part + 1, 0, 0
        out[i] = part
        count += 1
        total += size
    return out


def resolve_clips(filenames: pd.Series, listing: pd.DataFrame, root: str) -> pd.DataFrame:
    """``path`` and ``size_bytes`` for each CSV filename, from one listing of the videos root.

    A filename is relative to the root; a bare name not found there is matched by file name in nested
    folders when exactly one file has it. Missing (or ambiguous) clips keep ``root/filename`` with size -1.
    """
    by_rel = dict(zip(listing["relpath"], zip(listing["path"], listing["size_bytes"], strict=True), strict=True))
    base = listing["relpath"].str.rsplit("/", n=1).str[-1]
    unique = base[~base.duplicated(keep=False)]
    by_name = {name: by_rel[rel] for name, rel in zip(unique, listing.loc[unique.index, "relpath"], strict=True)}
    ambiguous = set(base[base.duplicated(keep=False)])
    paths, sizes, clashes = [], [], []
    for name in filenames:
        rel = name.removeprefix("./")
        hit = by_rel.get(rel) or (by_name.get(rel) if "/" not in rel else None)
        if hit is None and rel in ambiguous:
            clashes.append(name)
        path, size = hit if hit is not None else (join_location(root, rel), -1)
        paths.append(path)
        sizes.append(size)
    if clashes:
        log.warning("catalog: %d filenames match several nested files under %s and are treated as missing, e.g. %s",
                    len(clashes), root, clashes[:3])
    return pd.DataFrame({PATH: paths, SIZE_BYTES: np.asarray(sizes, dtype=np.int64)}, index=filenames.index)


def build_catalog(data: DataConfig, cfg: CatalogConfig, *, seed: int) -> pd.DataFrame:
    """One row per listed clip: id, path, size, split, fold, partition and the 24 labels (NaN for test)."""
    root = as_location(data.videos_root())  # workers may run elsewhere: never hand them a relative path
    options = data.storage_options
    train = read_competition_csv(data.labels, options)
    test = read_competition_csv(data.submission_format, options)
    overlap = set(train[FILENAME]) & set(test[FILENAME])
    if overlap:
        raise ValueError(f"{len(overlap)} clips are in both {data.labels} and {data.submission_format}")
    train[SPLIT] = SPLIT_TRAIN
    train[FOLD] = assign_folds(train[list(CLASS_NAMES)].to_numpy(), n_folds=cfg.n_folds, seed=seed)
    test[SPLIT] = SPLIT_TEST
    test[FOLD] = -1
    test[list(CLASS_NAMES)] = np.nan
    catalog = pd.concat([train, test], ignore_index=True)
    catalog[VIDEO_ID] = catalog[FILENAME]
    listing = list_files(root, options)
    catalog[[PATH, SIZE_BYTES]] = resolve_clips(catalog[FILENAME], listing, root)
    catalog[PARTITION] = assign_partitions(catalog[SIZE_BYTES].to_numpy(),
                                           videos_per_partition=cfg.videos_per_partition,
                                           partition_bytes=cfg.partition_bytes)
    catalog[list(CLASS_NAMES)] = catalog[list(CLASS_NAMES)].astype(np.float32)
    missing = int((catalog[SIZE_BYTES] < 0).sum())
    log.info("catalog: %d clips, %d entries listed under %s, %d partitions", len(catalog), len(listing), root,
             int(catalog[PARTITION].max()) + 1 if len(catalog) else 0)
    if missing:
        log.warning("catalog: %d listed clips are missing under %s (they will be error rows)", missing, root)
    columns = [VIDEO_ID, FILENAME, PATH, SIZE_BYTES, SPLIT, FOLD, PARTITION, *CLASS_NAMES]
    return catalog[columns]


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else -1
    except OSError:
        return -1


def catalog_from_paths(paths: list[Path] | list[str], root: Path | str, *, videos_per_partition: int,
                       sizes: list[int] | None = None, partition_bytes: int | None = None) -> pd.DataFrame:
    """An unlabelled (test-split) catalog of video files, ids relative to ``root`` (the predict path).

    ``paths`` are local paths or URLs; without ``sizes`` (from a listing) local files are measured.
    """
    root_text = str(root).rstrip("/")
    names = [str(p)[len(root_text) + 1:] if str(p).startswith(root_text + "/") else str(p).rsplit("/", 1)[-1]
             for p in paths]
    if sizes is None:
        sizes = [_local_size(Path(p)) for p in paths]
    frame = pd.DataFrame({VIDEO_ID: names, FILENAME: names, PATH: [str(p) for p in paths],
                          SIZE_BYTES: np.array(sizes, dtype=np.int64)})
    frame[SPLIT] = SPLIT_TEST
    frame[FOLD] = np.int32(-1)
    frame[PARTITION] = assign_partitions(frame[SIZE_BYTES].to_numpy(), videos_per_partition=videos_per_partition,
                                         partition_bytes=partition_bytes)
    for name in CLASS_NAMES:
        frame[name] = np.float32("nan")
    return frame


def write_catalog(catalog: pd.DataFrame, path: RunPath) -> None:
    write_parquet_atomic(pa.Table.from_pandas(catalog, preserve_index=False), path)
