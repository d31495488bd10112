"""Embeddings survive a new partitioning: rows already embedded are copied into the new parts, not decoded.

Changing ``catalog.videos_per_partition`` or ``catalog.partition_bytes`` cuts the same catalog rows into other
partitions, so every part's rows hash changes. Each part records its rows' ``[video_id, stamp]`` (``clips`` in
its metadata; the stamp is the clip file's size + version). Before the embed stage submits work,
:func:`plan_copies` moves every part about to be overwritten or dropped that was made with the same settings
(result hash) into ``.reuse/`` beside the parts, and indexes their rows by ``(video_id, stamp)``. A pending
partition whose rows are all in that index is written by :func:`copy_rows`, a Dask task that copies them in
the partition's order; the other partitions are embedded as usual. A replaced clip has a new stamp, so its
partition is embedded again. :func:`drop_reused` removes ``.reuse/`` once the stage has written every part;
a stage interrupted before that finds the moved parts there on the next run.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping

import pandas as pd
import pyarrow as pa

from jungletrap.schema import STAMP, STATUS, STATUS_ERROR, VIDEO_ID
from jungletrap.storage import RunPath, is_remote, read_schema, read_table, write_parquet_atomic

__all__ = ["REUSE_DIR", "copy_rows", "drop_reused", "plan_copies"]

log = logging.getLogger(__name__)

REUSE_DIR = ".reuse"
_META_KEY = b"jungletrap"

#: Per row of a new partition, in order: the moved-aside part holding it and its row number there.
Sources = list[tuple[RunPath, int]]


def _meta(path: RunPath) -> dict[str, object]:
    try:
        return json.loads((read_schema(path).metadata or {}).get(_META_KEY, b"{}"))
    except (OSError, pa.ArrowInvalid, ValueError):  # a damaged part is simply not reused
        return {}


def _move_aside(out_dir: RunPath, result_hash: str, partitions: set[int]) -> None:
    """Move the parts of ``partitions`` made with these settings into ``.reuse/`` (unique names: never clobber)."""
    aside = out_dir / REUSE_DIR
    for path in sorted(out_dir.glob("part-*.parquet")):
        if int(path.stem.split("-")[1]) not in partitions:
            continue
        meta = _meta(path)
        if meta.get("result_hash") != result_hash or not meta.get("clips"):
            continue
        if not is_remote(aside):
            aside.mkdir(exist_ok=True)
        path.rename(aside / f"{path.stem}-{uuid.uuid4().hex[:8]}.parquet")


def _index(out_dir: RunPath, result_hash: str) -> dict[tuple[str, str], tuple[RunPath, int]]:
    """``(video_id, stamp)`` → (moved-aside part, row) for every part in ``.reuse/`` made with these settings."""
    aside = out_dir / REUSE_DIR
    index: dict[tuple[str, str], tuple[RunPath, int]] = {}
    if not aside.exists():
        return index
    for path in sorted(aside.glob("*.parquet")):
        meta = _meta(path)
        if meta.get("result_hash") != result_hash:
            continue
        for row, (video_id, stamp) in enumerate(meta.get("clips") or []):  # type: ignore[union-attr]
            index[(str(video_id), str(stamp))] = (path, row)
    return index


def plan_copies(out_dir: RunPath, result_hash: str, pending: Mapping[int, pd.DataFrame],
                partitions: set[int]) -> dict[int, Sources]:
    """Move reusable parts aside, then return, per pending partition whose every row is in them, its sources.

    ``pending`` maps the partitions to write to their catalog rows (``video_id`` and, when the catalog has
    it, ``stamp``); ``partitions`` are all the catalog's partitions (parts of others are dropped later).
    Rows without a stamp are never reused: nothing tells that their file is unchanged.
    """
    if not out_dir.exists():
        return {}
    stale = {int(p.stem.split("-")[1]) for p in out_dir.glob("part-*.parquet")} - partitions
    _move_aside(out_dir, result_hash, set(pending) | stale)
    index = _index(out_dir, result_hash)
    if not index:
        return {}
    plan: dict[int, Sources] = {}
    for partition, rows in pending.items():
        if STAMP not in rows:
            continue
        keys = list(zip(rows[VIDEO_ID].astype(str), rows[STAMP].astype(str), strict=True))
        if all(key[1] and key in index for key in keys):
            plan[partition] = [index[key] for key in keys]
    if plan:
        log.info("embed: %d partitions (%d videos) rebuilt from earlier parts, without decoding", len(plan),
                 sum(len(s) for s in plan.values()))
    return plan


def copy_rows(sources: Sources, out_path: RunPath, metadata: dict[bytes, bytes]) -> dict[str, int]:
    """Dask task: write a part from rows of moved-aside parts, in the given order; return its counts."""
    paths = list(dict.fromkeys(path for path, _ in sources))
    tables = [read_table(path).replace_schema_metadata(None) for path in paths]
    offsets, total = {}, 0
    for path, table in zip(paths, tables, strict=True):
        offsets[path] = total
        total += table.num_rows
    table = pa.concat_tables(tables).take([offsets[path] + row for path, row in sources])
    expected = [entry[0] for entry in json.loads(metadata[_META_KEY])["clips"]]
    if table.column(VIDEO_ID).to_pylist() != expected:
        raise RuntimeError(f"{out_path}: the copied rows are not the partition's videos")
    write_parquet_atomic(table.replace_schema_metadata(metadata), out_path)
    failed = sum(1 for status in table.column(STATUS).to_pylist() if status == STATUS_ERROR)
    return {"videos": table.num_rows, "failed": failed}


def drop_reused(out_dir: RunPath) -> None:
    """Remove ``.reuse/`` once every part of the stage is written (nothing there is needed any more)."""
    aside = out_dir / REUSE_DIR
    if not aside.exists():
        return
    for path in aside.glob("*"):
        path.unlink()
    if not is_remote(aside):
        aside.rmdir()
