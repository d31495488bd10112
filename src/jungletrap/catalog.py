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

Every clip's ``stamp`` (its size and version: mtime locally, ETag on an object store) is kept, so a file
replaced under the same name is embedded again. :func:`read_inputs` checks the input files against each other
(columns, label values, disjoint splits, test labels for exactly the submission's rows) before any work: a
mismatch raises :class:`InputError`, one line naming the file, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from jungletrap.config import CatalogConfig, DataConfig, config_hash
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
    STAMP,
    VIDEO_ID,
)
from jungletrap.storage import RunPath, as_location, join_location, list_files, read_csv, write_parquet_atomic

__all__ = [
    "CATALOG_NAME",
    "InputError",
    "Inputs",
    "assign_folds",
    "assign_partitions",
    "build_catalog",
    "catalog_from_paths",
    "check_inputs",
    "clip_stamp",
    "fold_masks",
    "read_competition_csv",
    "read_inputs",
    "resolve_clips",
    "write_catalog",
]

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.parquet"


class InputError(ValueError):
    """An input file that cannot serve the run (unreadable, wrong columns or values, rows that do not match)."""


def read_competition_csv(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Read a labels or submission-format CSV (path or URL); check it has ``filename`` + the 24 classes in order."""
    try:
        frame = read_csv(path, storage_options, dtype={FILENAME: str})
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (ValueError, pd.errors.ParserError) as err:  # empty, binary, not CSV
        raise InputError(f"{path}: not a readable CSV ({type(err).__name__}: {err})") from None
    expected = [FILENAME, *CLASS_NAMES]
    if list(frame.columns) != expected:
        missing = [c for c in expected if c not in frame.columns]
        extra = [c for c in frame.columns if c not in expected]
        order = "" if missing or extra else " (same columns, another order)"
        raise InputError(
            f"{path}: columns must be filename + the 24 classes in competition order; "
            f"missing {missing}, unexpected {extra}{order}"
        )
    if frame[FILENAME].duplicated().any():
        dup = frame.loc[frame[FILENAME].duplicated(), FILENAME].iloc[0]
        raise InputError(f"{path}: filename {dup!r} is listed twice")
    return frame


def _check_labels(frame: pd.DataFrame, path: str) -> None:
    """Label columns hold 0 or 1 only (a NaN or a word would otherwise surface as a failed stage much later)."""
    values = frame[list(CLASS_NAMES)]
    bad = ~values.isin([0, 1])
    if bad.any(axis=None):
        row, col = np.argwhere(bad.to_numpy())[0]
        raise InputError(f"{path}: label {CLASS_NAMES[col]!r} of {frame[FILENAME].iloc[row]!r} is "
                         f"{values.iat[row, col]!s}, labels must be 0 or 1")


def _check_same_rows(names: pd.Series, expected: pd.Series, path: str, other: str) -> None:
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or extra:
        raise InputError(f"{path}: rows are not those of {other}: {len(missing)} of its clips missing "
                         f"(e.g. {missing[:3]}), {len(extra)} not in it (e.g. {extra[:3]})")


@dataclass(frozen=True)
class Inputs:
    """The checked input files and one listing of the videos root, read once per invocation."""

    labels: pd.DataFrame
    submission_format: pd.DataFrame
    root: str
    listing: pd.DataFrame

    def clips_hash(self) -> str:
        """Hash of every listed clip's name and stamp: changes when a clip is replaced, added or removed."""
        names = pd.concat([self.labels[FILENAME], self.submission_format[FILENAME]], ignore_index=True)
        stamps = resolve_clips(names, self.listing, self.root)[STAMP]
        return config_hash({"clips": [f"{n}\t{s}" for n, s in zip(names, stamps, strict=True)]})


def check_inputs(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the labels and submission format and check every input file against the others.

    Checked: each file's columns (``filename`` + the 24 classes), 0/1 label values, no clip in both labels and
    submission format, and test labels (when given) for exactly the submission format's clips. The first
    problem raises :class:`InputError` naming the file.
    """
    options = data.storage_options
    train = read_competition_csv(data.labels, options)
    _check_labels(train, data.labels)
    test = read_competition_csv(data.submission_format, options)
    overlap = sorted(set(train[FILENAME]) & set(test[FILENAME]))
    if overlap:
        raise InputError(f"{data.submission_format}: {len(overlap)} clips are also in {data.labels} "
                         f"(e.g. {overlap[:3]})")
    if data.test_labels:
        truth = read_competition_csv(data.test_labels, options)
        _check_same_rows(truth[FILENAME], test[FILENAME], data.test_labels, data.submission_format)
        _check_labels(truth, data.test_labels)
    return train, test


def read_inputs(data: DataConfig) -> Inputs:
    """:func:`check_inputs`, then one listing of the videos root (its stamps go into the stage hashes)."""
    train, test = check_inputs(data)
    root = as_location(data.videos_root())
    return Inputs(train, test, root, list_files(root, data.storage_options))


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


def clip_stamp(size: int, version: str) -> str:
    """What identifies a clip file's content without reading it: size and version (mtime or ETag)."""
    return f"{size}:{version}" if size >= 0 else ""


def resolve_clips(filenames: pd.Series, listing: pd.DataFrame, root: str) -> pd.DataFrame:
    """``path``, ``size_bytes`` and ``stamp`` for each CSV filename, from one listing of the videos root.

    A filename is relative to the root; a bare name not found there is matched by file name in nested
    folders when exactly one file has it. Missing (or ambiguous) clips keep ``root/filename`` with size -1
    and an empty stamp.
    """
    stamps = [clip_stamp(int(n), str(v)) for n, v in zip(listing["size_bytes"], listing["version"], strict=True)]
    by_rel = dict(zip(listing["relpath"], zip(listing["path"], listing["size_bytes"], stamps, strict=True),
                      strict=True))
    base = listing["relpath"].str.rsplit("/", n=1).str[-1]
    unique = base[~base.duplicated(keep=False)]
    by_name = {name: by_rel[rel] for name, rel in zip(unique, listing.loc[unique.index, "relpath"], strict=True)}
    ambiguous = set(base[base.duplicated(keep=False)])
    paths, sizes, found, clashes = [], [], [], []
    for name in filenames:
        rel = name.removeprefix("./")
        hit = by_rel.get(rel) or (by_name.get(rel) if "/" not in rel else None)
        if hit is None and rel in ambiguous:
            clashes.append(name)
        path, size, stamp = hit if hit is not None else (join_location(root, rel), -1, "")
        paths.append(path)
        sizes.append(size)
        found.append(stamp)
    if clashes:
        log.warning("catalog: %d filenames match several nested files under %s and are treated as missing, e.g. %s",
                    len(clashes), root, clashes[:3])
    return pd.DataFrame({PATH: paths, SIZE_BYTES: np.asarray(sizes, dtype=np.int64), STAMP: found},
                        index=filenames.index)


def build_catalog(data: DataConfig, cfg: CatalogConfig, *, seed: int, inputs: Inputs | None = None) -> pd.DataFrame:
    """One row per listed clip: id, path, size, stamp, split, fold, partition and the 24 labels (NaN for test).

    ``inputs`` (from :func:`read_inputs`) saves reading the CSVs and listing the videos a second time.
    """
    if inputs is None:
        train, test = check_inputs(data.model_copy(update={"test_labels": None}))
        root = as_location(data.videos_root())  # workers may run elsewhere: never hand them a relative path
        listing = list_files(root, data.storage_options)
    else:
        train, test, root, listing = (inputs.labels.copy(), inputs.submission_format.copy(), inputs.root,
                                      inputs.listing)
    train[SPLIT] = SPLIT_TRAIN
    train[FOLD] = assign_folds(train[list(CLASS_NAMES)].to_numpy(), n_folds=cfg.n_folds, seed=seed)
    test[SPLIT] = SPLIT_TEST
    test[FOLD] = -1
    test[list(CLASS_NAMES)] = np.nan
    catalog = pd.concat([train, test], ignore_index=True)
    catalog[VIDEO_ID] = catalog[FILENAME]
    catalog[[PATH, SIZE_BYTES, STAMP]] = resolve_clips(catalog[FILENAME], listing, root)
    catalog[PARTITION] = assign_partitions(catalog[SIZE_BYTES].to_numpy(),
                                           videos_per_partition=cfg.videos_per_partition,
                                           partition_bytes=cfg.partition_bytes)
    catalog[list(CLASS_NAMES)] = catalog[list(CLASS_NAMES)].astype(np.float32)
    missing = int((catalog[SIZE_BYTES] < 0).sum())
    log.info("catalog: %d clips, %d entries listed under %s, %d partitions", len(catalog), len(listing), root,
             int(catalog[PARTITION].max()) + 1 if len(catalog) else 0)
    if missing:
        log.warning("catalog: %d listed clips are missing under %s (they will be error rows)", missing, root)
    columns = [VIDEO_ID, FILENAME, PATH, SIZE_BYTES, STAMP, SPLIT, FOLD, PARTITION, *CLASS_NAMES]
    return catalog[columns]


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else -1
    except OSError:
        return -1


def _local_version(path: Path) -> str:
    try:
        return str(path.stat().st_mtime)  # as list_files reports it
    except OSError:
        return ""


def catalog_from_paths(paths: list[Path] | list[str], root: Path | str, *, videos_per_partition: int,
                       sizes: list[int] | None = None, partition_bytes: int | None = None,
                       versions: list[str] | None = None) -> pd.DataFrame:
    """An unlabelled (test-split) catalog of video files, ids relative to ``root`` (the predict path).

    ``paths`` are local paths or URLs; without ``sizes`` (from a listing) local files are measured, and
    without ``versions`` (from a listing) local files' mtimes are the stamps.
    """
    root_text = str(root).rstrip("/")
    names = [str(p)[len(root_text) + 1:] if str(p).startswith(root_text + "/") else str(p).rsplit("/", 1)[-1]
             for p in paths]
    if sizes is None:
        sizes = [_local_size(Path(p)) for p in paths]
    if versions is None:
        versions = [_local_version(Path(p)) for p in paths]
    frame = pd.DataFrame({VIDEO_ID: names, FILENAME: names, PATH: [str(p) for p in paths],
                          SIZE_BYTES: np.array(sizes, dtype=np.int64),
                          STAMP: [clip_stamp(int(n), str(v)) for n, v in zip(sizes, versions, strict=True)]})
    frame[SPLIT] = SPLIT_TEST
    frame[FOLD] = np.int32(-1)
    frame[PARTITION] = assign_partitions(frame[SIZE_BYTES].to_numpy(), videos_per_partition=videos_per_partition,
                                         partition_bytes=partition_bytes)
    for name in CLASS_NAMES:
        frame[name] = np.float32("nan")
    return frame


def write_catalog(catalog: pd.DataFrame, path: RunPath) -> None:
    write_parquet_atomic(pa.Table.from_pandas(catalog, preserve_index=False), path)
