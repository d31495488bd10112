"""Small helpers for writing artifacts safely: atomic Parquet/JSON/text writes and stale temp cleanup.

A partition file is either absent or whole: it is written under a temporary name in the same directory and
renamed into place, which is atomic on POSIX filesystems, so a killed worker never leaves a partial part.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "TMP_MARK",
    "path_token",
    "remove_stale_temps",
    "write_json_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
]

TMP_MARK = ".tmp-"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(data: Any, path: Path) -> None:
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True, default=str), path)


def path_token(path: Path) -> str:
    """A short id of an output location, put in task keys so two runs on one cluster never share a key.

    Dask treats tasks with the same key as the same task: a second run would receive the first run's result
    and never write its own file.
    """
    import hashlib

    return hashlib.sha256(str(Path(path).absolute()).encode()).hexdigest()[:6]


def remove_stale_temps(directory: Path) -> int:
    """Delete temporary files left by writers that died mid-write; return how many were removed."""
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if TMP_MARK in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
