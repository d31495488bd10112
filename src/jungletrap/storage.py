"""Where data lives: fsspec URLs and storage options, one-call listings, and atomic artifact writes.

Inputs (videos, CSVs) and the run directory may be local paths or any fsspec URL (``s3://``, ``gs://``,
``abfs://``, ``file://``). Storage options (endpoint, profile, anonymous access...) come from the config and
apply to remote URLs only; :func:`public_storage_options` is the only form of them that is ever saved or hashed
(credentials normally come from the environment or a profile on every worker, never from the config file).

A partition file is either absent or whole: locally it is written under a temporary name in the same
directory and renamed into place (atomic on POSIX filesystems); on an object store a single PUT (or a
completed multipart upload) is atomic by itself, so it is written directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from upath import UPath

__all__ = [
    "TMP_MARK",
    "RunPath",
    "as_location",
    "file_stamp",
    "filesystem",
    "is_remote",
    "join_location",
    "list_files",
    "open_clip",
    "open_input",
    "parquet_write_options",
    "path_token",
    "public_storage_options",
    "read_csv",
    "read_parquet",
    "read_schema",
    "read_table",
    "remove_stale_temps",
    "run_path",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
]

TMP_MARK = ".tmp-"

#: A run directory or a file in it: a local ``Path``, or a ``UPath`` (which carries its storage options).
RunPath = Path | UPath

#: Top-level storage options that hold no secret: the only ones saved with a run or hashed into its manifest.
_PUBLIC_OPTIONS = frozenset({
    "endpoint_url", "anon", "profile", "region_name", "requester_pays", "use_ssl", "client_kwargs",
    "config_kwargs", "default_block_size", "default_cache_type", "default_fill_cache", "version_aware",
    "account_name", "project", "use_listings_cache", "listings_expiry_time", "max_concurrency",
})
#: Inside the public options' nested mappings (``client_kwargs``...), keys that may hold a secret are dropped.
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|sas|connection|auth|cookie|signature|private",
                         re.IGNORECASE)


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL with a protocol other than ``file://`` (``s3://``, ``gs://``, ``abfs://``...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local(location: str | os.PathLike[str]) -> str:
    return os.path.expanduser(str(location).removeprefix("file://"))


def public_storage_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The storage options safe to save or hash: known non-secret keys, nested secrets dropped, JSON values only.

    Unknown top-level keys are dropped too (a credential under an unexpected name must never reach a file).
    """
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))
                    and _jsonable(v)}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value if _jsonable(v)]
        return value

    return {k: clean(v) for k, v in (options or {}).items() if k in _PUBLIC_OPTIONS and _jsonable(v)}


def _jsonable(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) for k in value)
    return value is None or isinstance(value, (str, int, float, bool, list, tuple))


def filesystem(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
               ) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and the path in it; storage options apply to remote URLs only."""
    if isinstance(location, UPath) and is_remote(location):
        return location.fs, location.path
    if not is_remote(location):
        return LocalFileSystem(), os.path.abspath(_local(location))
    return url_to_fs(str(location), **dict(storage_options or {}))


def _location(fs: AbstractFileSystem, path: str) -> str:
    """A path from ``fs`` as a location workers can open: a plain local path, or a full URL."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def join_location(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL (no normalisation: keys with spaces stay as they are)."""
    return f"{str(root).rstrip('/')}/{name.lstrip('/')}"


def as_location(location: str | os.PathLike[str]) -> str:
    """An absolute local path (symlinks resolved), or the URL as given: workers never get a relative path."""
    if is_remote(location):
        return str(location)
    return str(Path(_local(location)).resolve())


def list_files(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
               ) -> pd.DataFrame:
    """Every file under ``location`` with its size, from one recursive listing (``fs.find(detail=True)``).

    On S3 that is one paginated ListObjectsV2 call (1,000 keys a page), never a request per file. Columns:
    ``relpath`` (to ``location``), ``path`` (what workers open), ``size_bytes`` (-1 for what is not a
    regular file: a broken symlink, a directory) and ``version`` (mtime or ETag). A missing location lists nothing.
    Directories are listed too (a folder named like a clip must become an error row, not vanish).
    """
    fs, root = filesystem(location, storage_options)
    root = root.rstrip("/") or root
    found = fs.find(root, detail=True, withdirs=True)
    rows = []
    for name, info in sorted(found.items()):
        if name.rstrip("/") == root and info.get("type") == "directory":
            continue
        rel = name[len(root) + 1:] if name.startswith(root + "/") else name.rsplit("/", 1)[-1]
        size = int(info.get("size") or 0) if info.get("type") == "file" else -1
        rows.append((rel, _location(fs, name), size, _version(info)))
    return pd.DataFrame(rows, columns=["relpath", "path", "size_bytes", "version"]).astype({"size_bytes": "int64"})


def _version(info: Mapping[str, Any]) -> str:
    """What changes when a file is rewritten: its mtime locally, its ETag (or modification time) remotely.

    A local mtime keeps its sub-second part: a clip replaced within the same second is still a new version.
    """
    version = info.get("mtime", info.get("ETag", info.get("etag", info.get("LastModified"))))
    return repr(version) if isinstance(version, float) else str(version)


@contextmanager
def open_input(location: str | os.PathLike[str], mode: str = "rb",
               storage_options: Mapping[str, Any] | None = None) -> Iterator[IO[Any]]:
    """Open a local path, URL or ``UPath`` for reading or writing, with the storage options for remote URLs."""
    if isinstance(location, UPath):
        with location.open(mode) as handle:
            yield handle
        return
    fs, path = filesystem(location, storage_options)
    with fs.open(path, mode) as handle:
        yield handle


def read_csv(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
             **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of a local path or a URL."""
    with open_input(location, "rb", storage_options) as handle:
        return pd.read_csv(handle, **kwargs)


def file_stamp(location: str | None, storage_options: Mapping[str, Any] | None = None) -> list[Any]:
    """``[location, size, version]`` of an input file (``[location, None]`` when absent), for stage hashes."""
    if not location:
        return [location, None]
    try:
        fs, path = filesystem(location, storage_options)
        info = fs.info(path)
    except (FileNotFoundError, OSError, ValueError):
        return [location, None]
    return [location, info.get("size"), _version(info)]


@contextmanager
def open_clip(path: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[str | IO[bytes]]:
    """What the decoder opens: a local path as it is, a remote clip as a file object (never the whole file).

    A remote clip that cannot be opened raises :class:`jungletrap.video.VideoDecodeError` naming the URL, like
    a local one, so it becomes an error row.
    """
    if not is_remote(path):
        yield path
        return
    from jungletrap.video import VideoDecodeError

    try:
        fs, key = filesystem(path, storage_options)
        handle = fs.open(key, "rb")
    except FileNotFoundError:
        raise VideoDecodeError(f"{path}: file not found") from None
    except (OSError, ValueError, ImportError) as err:
        raise VideoDecodeError(f"{path}: cannot open ({type(err).__name__}: {err})") from None
    try:
        handle.name = path  # how decode errors name the clip
    except AttributeError:
        pass
    with handle:
        yield handle


def run_path(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> RunPath:
    """The run directory (or a file in it) as a path object: a ``Path`` locally, a ``UPath`` for a URL.

    A ``UPath`` carries its storage options to the workers it is sent to. Listings are never cached: workers
    write parts that the client lists right after.
    """
    if isinstance(location, UPath) and is_remote(location):
        return location
    if is_remote(location):
        return UPath(str(location), **{"use_listings_cache": False, **dict(storage_options or {})})
    return Path(_local(location))


def _fs_path(path: RunPath | str) -> tuple[AbstractFileSystem | None, str]:
    """``(filesystem, path)`` for pyarrow: ``None`` for a local file (pyarrow's own fast local reader)."""
    if isinstance(path, UPath) and is_remote(path):
        return path.fs, path.path
    if is_remote(path):
        return filesystem(path)
    return None, _local(path)


def read_parquet(path: RunPath | str, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_parquet`` of a local or remote file or directory (``columns``, ``filters``...)."""
    fs, where = _fs_path(path)
    if fs is None:
        return pd.read_parquet(where, **kwargs)
    return pd.read_parquet(where, filesystem=fs, **kwargs)


def read_table(path: RunPath | str, **kwargs: Any) -> pa.Table:
    """``pyarrow.parquet.read_table`` of a local or remote file or directory."""
    fs, where = _fs_path(path)
    return pq.read_table(where, filesystem=fs, **kwargs)


def read_schema(path: RunPath | str) -> pa.Schema:
    """The Parquet schema (with key-value metadata) of a local or remote file; reads only the footer."""
    fs, where = _fs_path(path)
    if fs is None:
        return pq.read_schema(where)
    with fs.open(where, "rb") as handle:
        return pq.read_schema(handle)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(data: bytes, path: RunPath) -> None:
    """Write ``data`` to ``path``: locally via a temporary file and a rename, remotely in one upload."""
    if is_remote(path):
        path.write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _float_columns(schema: pa.Schema) -> dict[str, str]:
    """Top-level columns whose values (or list elements) are floating point -> their Parquet leaf column path."""
    out = {}
    for field in schema:
        kind, leaf = field.type, field.name
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind, leaf = kind.value_type, f"{leaf}.list.element"  # Parquet's compliant nested layout
        if pa.types.is_floating(kind):
            out[field.name] = leaf
    return out


def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd; float columns byte-stream-split and never dictionary-encoded, other columns dictionary-encoded.

    Embeddings and pooled features are near-unique floats: a dictionary only costs time (every value hashed, then
    the dictionary abandoned). Measured on a 32-clip part of 45 x 1280 float16 frames: writes 7x faster, reads
    4.5x faster, no larger. Only the encoding changes; the values read back are the same.
    """
    floats = _float_columns(schema)
    return {"compression": "zstd", "use_dictionary": [n for n in schema.names if n not in floats] or False,
            "column_encoding": dict.fromkeys(floats.values(), "BYTE_STREAM_SPLIT") or None}


def write_parquet_atomic(table: pa.Table, path: RunPath) -> None:
    """Write ``table`` to ``path`` via a temporary file and an atomic rename (one upload on an object store)."""
    options = parquet_write_options(table.schema)
    if is_remote(path):
        with path.open("wb") as handle:
            pq.write_table(table, handle, **options)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: RunPath) -> None:
    write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(data: Any, path: RunPath) -> None:
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True, default=str), path)


def path_token(path: RunPath | str) -> str:
    """A short id of an output location, put in task keys so two runs on one cluster never share a key.

    Dask treats tasks with the same key as the same task: a second run would receive the first run's result
    and never write its own file.
    """
    where = str(path) if is_remote(path) else str(Path(_local(path)).absolute())
    return hashlib.sha256(where.encode()).hexdigest()[:6]


def remove_stale_temps(directory: RunPath) -> int:
    """Delete temporary files left by writers that died mid-write; return how many were removed.

    Object stores get no temporary files (their uploads are atomic), so there is nothing to clean there.
    """
    if is_remote(directory) or not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if TMP_MARK in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
