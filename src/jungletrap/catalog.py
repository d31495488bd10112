"""Catalog stage: the competition CSVs + the videos root → ``catalog.parquet`` with splits, folds, partitions.

Every clip named in ``train_labels.csv`` (split ``train``) or ``submission_format.csv`` (split ``test``) gets a
row, whether or not its file exists: a missing file becomes an error row in the embed stage instead of being
dropped silently. Folds come from multi-label iterative stratification (``iterative-stratification``), so rare
classes are spread over the folds; the same folds serve every model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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
from jungletrap.storage import write_parquet_atomic

__all__ = [
    "CATALOG_NAME",
    "assign_folds",
    "build_catalog",
    "catalog_from_paths",
    "fold_masks",
    "read_competition_csv",
    "write_catalog",
]

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.parquet"


def read_competition_csv(path: str | Path) -> pd.DataFrame:
    """Read a labels or submission-format CSV and check it has ``filename`` + the 24 classes in order."""
    frame = pd.read_csv(path, dtype={FILENAME: str})
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


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size if path.is_file() else -1
    except OSError:
        return -1


def build_catalog(data: DataConfig, cfg: CatalogConfig, *, seed: int) -> pd.DataFrame:
    """One row per listed clip: id, path, size, split, fold, partition and the 24 labels (NaN for test)."""
    root = Path(data.videos).expanduser().resolve()  # workers may run elsewhere: never hand them a relative path
    train = read_competition_csv(data.labels)
    test = read_competition_csv(data.submission_format)
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
    paths = [root / name for name in catalog[FILENAME]]
    catalog[PATH] = [str(p) for p in paths]
    catalog[SIZE_BYTES] = np.array([_file_size(p) for p in paths], dtype=np.int64)
    catalog[PARTITION] = (np.arange(len(catalog)) // cfg.videos_per_partition).astype(np.int32)
    catalog[list(CLASS_NAMES)] = catalog[list(CLASS_NAMES)].astype(np.float32)
    missing = int((catalog[SIZE_BYTES] < 0).sum())
    if missing:
        log.warning("catalog: %d listed clips are missing under %s (they will be error rows)", missing, root)
    columns = [VIDEO_ID, FILENAME, PATH, SIZE_BYTES, SPLIT, FOLD, PARTITION, *CLASS_NAMES]
    return catalog[columns]


def catalog_from_paths(paths: list[Path], root: Path, *, videos_per_partition: int) -> pd.DataFrame:
    """An unlabelled (test-split) catalog of video files, ids relative to ``root`` (the predict path)."""
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else p.name for p in paths]
    frame = pd.DataFrame({VIDEO_ID: names, FILENAME: names, PATH: [str(p) for p in paths],
                          SIZE_BYTES: np.array([_file_size(p) for p in paths], dtype=np.int64)})
    frame[SPLIT] = SPLIT_TEST
    frame[FOLD] = np.int32(-1)
    frame[PARTITION] = (np.arange(len(frame)) // videos_per_partition).astype(np.int32)
    for name in CLASS_NAMES:
        frame[name] = np.float32("nan")
    return frame


def write_catalog(catalog: pd.DataFrame, path: Path) -> None:
    write_parquet_atomic(pa.Table.from_pandas(catalog, preserve_index=False), path)
