"""Embed stage: run the embedding UDF over every catalog partition on the cluster, one Parquet part each.

Each task reads its own rows from ``catalog.parquet`` (the client never ships video bytes or embeddings),
runs :func:`jungletrap.udfs.embed.embed_partition`, and writes ``part-NNNNN.parquet`` atomically with the
settings' hash in the file metadata. A part that exists with the same hashes is complete and is skipped on the
next run, so an interrupted stage resumes where it stopped and never writes a video twice. The task itself is
idempotent too (a complete part is returned, not rewritten), and each task's future is released once its
result is read, so a worker lost late in the stage costs only the partitions it had in flight.
Several backbones (``embed.backbones``) write one dataset each (``embeddings/<backbone>/``); a partition's task
decodes each clip once for every backbone whose part is not yet complete
(:func:`jungletrap.udfs.embed.embed_partition_backbones`), so each dataset resumes on its own and adding a
backbone to a finished run embeds only the new one. A part's rows hash covers each clip's stamp (size +
version), so a clip replaced under the same name is embedded again; after a change of partition sizes, rows
already embedded are copied into the new parts (:mod:`jungletrap.embed_reuse`) instead of being decoded again.

The stage's counts (``failed`` above all) are read from every part, those of earlier runs included: a resumed,
forced or copied run reports every error row it holds, not only those of its last invocation.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client

from jungletrap import __version__
from jungletrap.backbones import get_spec
from jungletrap.cluster import gpu_resources
from jungletrap.config import EmbedConfig, config_hash
from jungletrap.embed_reuse import copy_rows, drop_reused, plan_copies
from jungletrap.schema import ERROR, PARTITION, PATH, STAMP, STATUS, STATUS_ERROR, VIDEO_ID, WARNING
from jungletrap.storage import (
    RunPath,
    path_token,
    read_parquet,
    read_schema,
    remove_stale_temps,
    write_parquet_atomic,
)
from jungletrap.tasks import results_as_completed
from jungletrap.udfs.embed import (
    EMBED_SCHEMA,
    EMBED_SCHEMA_VERSION,
    EmbedSettings,
    embed_partition_backbones,
    resolve_device,
    runtime_for,
)
from jungletrap.weights import ResolvedWeights, WeightsError, resolve_weights

__all__ = [
    "embed_settings",
    "embed_settings_all",
    "embed_catalog",
    "pin_weights",
    "read_embedding_meta",
    "read_part_summary",
    "count_failures",
    "result_hash",
    "RESULT_KEYS",
    "part_path",
    "EmbedCounts",
    "TooManyFailures",
]

log = logging.getLogger(__name__)

META_KEY = b"jungletrap"

EmbedCounts = dict[str, int]
#: Reasons named when the stage stops for too many failures.
N_REASONS = 3


class TooManyFailures(RuntimeError):
    """More clips failed than ``run.max_failed_fraction`` allows; ``counts`` are the stage's counts so far."""

    def __init__(self, message: str, counts: EmbedCounts) -> None:
        super().__init__(message)
        self.counts = counts


def embed_settings(cfg: EmbedConfig, backbone: str | None = None) -> EmbedSettings:
    """The UDF's settings for one backbone of ``cfg`` (its main one unless ``backbone`` is named)."""
    backbone = backbone or cfg.backbone_names[0]
    return EmbedSettings(
        backbone=backbone,
        sample_fps=cfg.sample_fps,
        max_seconds=cfg.max_seconds,
        n_frames=cfg.n_frames,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        device=cfg.device,
        decode_timeout_s=cfg.decode_timeout_s,
        prefetch_videos=cfg.prefetch_videos,
        decode_threads=cfg.decode_threads,
        decode_processes=cfg.decode_processes,
        codec_threads=cfg.codec_threads,
        input_size=cfg.input_size,
        runtime=cfg.runtime,
        weights=cfg.weights_for(backbone),
    )


def embed_settings_all(cfg: EmbedConfig) -> list[EmbedSettings]:
    """Settings for every backbone of ``cfg``, the main one first."""
    return [embed_settings(cfg, name) for name in cfg.backbone_names]


def pin_weights(client: Client, settings: EmbedSettings, *, gpu: bool = False) -> EmbedSettings:
    """Resolve ``embed.weights`` once, on a worker of the kind that embeds (a missing file is a
    :class:`~jungletrap.weights.WeightsError` before any partition runs); every task then checks its worker's."""
    resolved = client.submit(_resolve_weights_or_error, settings.backbone, settings.weights, pure=False,
                             resources=gpu_resources(gpu)).result()
    if isinstance(resolved, WeightsError):
        raise resolved
    return replace(settings, pinned_weights=resolved)


def _resolve_weights_or_error(backbone: str, weights: str | None) -> ResolvedWeights | WeightsError:
    """On a worker: the error is returned, not raised, so the worker logs no traceback for a config error."""
    try:
        return resolve_weights(backbone, weights)
    except WeightsError as err:
        return err


#: The settings that change the numbers written (not batch size, prefetch, timeouts, the device or the runtime:
#: OpenVINO's features agree with torch's to 1e-3), besides the weights' identity.
RESULT_KEYS: tuple[str, ...] = ("backbone", "sample_fps", "max_seconds", "n_frames", "dtype", "input_size")


def result_hash(settings: EmbedSettings) -> str:
    """The hash written in every part: equal hashes, equal embeddings."""
    return _result_hash(settings)


def _result_hash(settings: EmbedSettings) -> str:
    """Hash of :data:`RESULT_KEYS` and the weights' identity (file sha256 or random seed)."""
    values: dict[str, Any] = {k: getattr(settings, k) for k in RESULT_KEYS}
    values["weights"] = settings.pinned_weights.identity if settings.pinned_weights else None
    if values["input_size"] is None:  # the backbone's own size: hashed as before the key existed
        del values["input_size"]
    return config_hash({"schema": EMBED_SCHEMA_VERSION, **values})


def part_path(out_dir: RunPath, partition: int) -> RunPath:
    return out_dir / f"part-{partition:05d}.parquet"


def read_embedding_meta(path: RunPath | str) -> dict[str, Any]:
    """The jungletrap key-value metadata of an embedding part (backbone, T, D, sampling, hash...)."""
    meta = read_schema(path).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))


def _stamps(rows: pd.DataFrame) -> list[str]:
    """Each row's clip stamp (size + version; empty for catalogs written before stamps were recorded)."""
    return [str(s) for s in rows[STAMP]] if STAMP in rows else [""] * len(rows)


def _rows_hash(rows: pd.DataFrame) -> str:
    """Identity of a partition's inputs: its video ids, paths and clip stamps, in order."""
    keys = [f"{v}\t{p}" + (f"\t{s}" if s else "")
            for v, p, s in zip(rows[VIDEO_ID], rows[PATH], _stamps(rows), strict=True)]
    return config_hash({"rows": keys})


def _clips(rows: pd.DataFrame) -> list[list[str]]:
    """``[video_id, stamp]`` per row, kept in the part's metadata: what a later partitioning may copy."""
    return [[str(v), s] for v, s in zip(rows[VIDEO_ID], _stamps(rows), strict=True)]


def _file_metadata(settings: EmbedSettings, rows_hash: str, n_rows: int,
                   clips: list[list[str]] | None = None) -> dict[bytes, bytes]:
    spec = get_spec(settings.backbone)
    info = {
        "artifact": "embeddings",
        "backbone": spec.name,
        "feature_dim": spec.feature_dim,
        "input_size": settings.input_size or spec.input_size,
        "preprocessing": {"mean": spec.mean, "std": spec.std, "resize": "letterbox-pad"},
        "max_frames": _max_frames(settings),
        "settings": asdict(settings),
        "weights": asdict(settings.pinned_weights) if settings.pinned_weights else None,
        "runtime": runtime_for(settings, resolve_device(settings.device))[0],
        "result_hash": _result_hash(settings),
        "rows_hash": rows_hash,
        "n_rows": n_rows,
        "clips": clips or [],
        "package_version": __version__,
    }
    return {META_KEY: json.dumps(info, default=str).encode()}


def _max_frames(settings: EmbedSettings) -> int:
    if settings.n_frames is not None:
        return settings.n_frames
    return max(1, int(round(settings.sample_fps * settings.max_seconds)))


def _reason(video_id: str, error: str) -> str:
    """An error without the clip's name (errors start with its path or URL, which ends with its id)."""
    _, sep, tail = error.partition(f"{video_id}: ")
    return tail if sep else error


def _summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """Rows, error rows (with their reasons) and warned rows of a part, from its id/status/error/warning."""
    failed = frame[frame[STATUS] == STATUS_ERROR]
    warned = int(frame[WARNING].notna().sum()) if WARNING in frame.columns else 0  # parts before schema 3: none
    reasons = Counter(_reason(str(v), str(e)) for v, e in zip(failed[VIDEO_ID], failed[ERROR], strict=True))
    return {"videos": len(frame), "failed": len(failed), "warnings": warned, "reasons": dict(reasons)}


def read_part_summary(path: RunPath | str) -> dict[str, Any]:
    """Counts of one embedding part read from the file (four small columns, never the embeddings)."""
    columns = [c for c in (VIDEO_ID, STATUS, ERROR, WARNING) if c in read_schema(path).names]
    return _summarize(read_parquet(path, columns=columns))


def count_failures(embed_dir: RunPath) -> int:
    """Error rows in every embedding part of ``embed_dir`` (0 when it has none), read on the caller."""
    return sum(read_part_summary(p)["failed"] for p in sorted(embed_dir.glob("part-*.parquet")))


def embed_catalog_partition(catalog_path: RunPath, partition: int, out_path: RunPath | Sequence[RunPath],
                            settings: EmbedSettings | Sequence[EmbedSettings],
                            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dask task: read one partition's catalog rows, embed them, write the part atomically; return its counts.

    With several backbones (``out_path`` and ``settings`` one per backbone, in the same order) each clip is
    decoded once for every backbone whose part is not complete, and the counts are those of the first part
    written (every backbone of one decode has the same error rows). Idempotent: a part already complete for
    these rows and settings (the task runs again because its worker died after writing it, or another run
    wrote it) is not recomputed; when all are, the counts are read from the first part's file.
    ``storage_options`` open remote clips; the worker reads the clips itself, the client never does.
    """
    paths = [out_path] if isinstance(out_path, RunPath | str) else list(out_path)
    every = [settings] if isinstance(settings, EmbedSettings) else list(settings)
    if len(paths) != len(every):
        raise ValueError(f"{len(paths)} output parts for {len(every)} backbones (partition {partition})")
    rows = read_parquet(catalog_path, filters=[(PARTITION, "==", partition)])
    rows_hash = _rows_hash(rows)
    todo = [i for i, (path, one) in enumerate(zip(paths, every, strict=True))
            if not _is_complete(path, _result_hash(one), rows_hash)]
    if not todo:
        return {**read_part_summary(paths[0]), "reused": True}
    frames = embed_partition_backbones(rows, settings=[every[i] for i in todo], storage_options=storage_options)
    for i, frame in zip(todo, frames, strict=True):
        if len(frame) != len(rows) or list(frame[VIDEO_ID]) != list(rows[VIDEO_ID]):
            raise RuntimeError(f"embed UDF returned {len(frame)} rows for {len(rows)} videos (partition "
                               f"{partition}, {every[i].backbone})")
        table = pa.Table.from_pandas(frame, schema=EMBED_SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata(_file_metadata(every[i], rows_hash, len(frame), _clips(rows)))
        write_parquet_atomic(table, paths[i])
    return {**_summarize(frames[0]), "reused": False}


def _copy_part(sources: Any, out_path: RunPath, metadata: dict[bytes, bytes]) -> dict[str, Any]:
    """Dask task: a part made of rows already embedded (a change of partition sizes); its counts as any part's."""
    copy_rows(sources, out_path, metadata)
    return {**read_part_summary(out_path), "reused": False}


def _is_complete(path: RunPath, result_hash: str, rows_hash: str) -> bool:
    """A part is complete when it exists, is readable, and was made by these settings from these rows."""
    if not path.is_file():
        return False
    try:
        meta = read_embedding_meta(path)
    except (OSError, pa.ArrowInvalid, ValueError):
        return False
    return meta.get("result_hash") == result_hash and meta.get("rows_hash") == rows_hash


def _remove_foreign_parts(out_dir: RunPath, partitions: set[int]) -> None:
    """Drop parts of partitions the catalog no longer has, so later stages never read stale videos."""
    for path in out_dir.glob("part-*.parquet"):
        if int(path.stem.split("-")[1]) not in partitions:
            log.warning("embed: removing %s (not a partition of the current catalog)", path)
            path.unlink()


class _Tally:
    """The stage's counts over every part, and the stop rule for too many failures.

    ``max_failed_fraction`` is checked after every part: once the error rows seen so far exceed that share of
    *all* the catalog's clips, the final count must exceed it too, so the stage stops at once rather than after
    embedding the rest (a bug that fails every clip is caught after that share of the stage, not at its end).
    """

    def __init__(self, total_videos: int, partitions: int, max_failed_fraction: float | None) -> None:
        self.total, self.max_fraction = total_videos, max_failed_fraction
        self.counts: EmbedCounts = {"partitions": partitions, "videos": 0, "embedded": 0, "skipped": 0,
                                    "failed": 0, "warnings": 0}
        self.reasons: Counter[str] = Counter()

    def add(self, part: Mapping[str, Any], *, skipped: bool) -> None:
        for key in ("videos", "failed", "warnings"):
            self.counts[key] += int(part[key])
        self.counts["skipped" if skipped else "embedded"] += int(part["videos"]) - (0 if skipped else part["failed"])
        self.reasons.update(part["reasons"])

    def check(self, out_dir: RunPath) -> None:
        """Raise :class:`TooManyFailures` when the failures already exceed the allowed share of the clips."""
        failed = self.counts["failed"]
        if self.max_fraction is None or failed <= self.max_fraction * self.total:
            return
        reasons = "; ".join(f"{reason} ({n})" for reason, n in self.reasons.most_common(N_REASONS))
        raise TooManyFailures(
            f"embed: {failed} of {self.total} videos failed ({failed / self.total:.1%}, more than "
            f"run.max_failed_fraction={self.max_fraction:g}); commonest reasons: {reasons}. Every failed clip and "
            f"its reason are in the error column of {out_dir}; raise run.max_failed_fraction to go on regardless.",
            dict(self.counts))


def _count_skipped(client: Client, paths: list[RunPath], token: str) -> Iterable[dict[str, Any]]:
    """Counts of the parts already complete, read on the workers (two small columns a part)."""
    futures = client.map(read_part_summary, paths, key=[f"embed-count-{p.stem}-{token}" for p in paths], pure=False)
    return results_as_completed(client, futures)


def _task_hash(result_hashes: list[str]) -> str:
    """One backbone's result hash, or a hash of several's (a task that embeds them together)."""
    return result_hashes[0] if len(result_hashes) == 1 else config_hash({"backbones": result_hashes})


def _out_dirs(out_dir: RunPath | Mapping[str, RunPath], cfg: EmbedConfig) -> dict[str, RunPath]:
    """Backbone -> dataset directory, every backbone of ``cfg`` in order (a single path serves one backbone)."""
    names = cfg.backbone_names
    if isinstance(out_dir, Mapping):
        if list(out_dir) != names:
            raise ValueError(f"embed: output directories for {list(out_dir)}, but the backbones are {names}")
        return dict(out_dir)
    if len(names) > 1:
        raise ValueError(f"embed: {len(names)} backbones {names} need one output directory each (a mapping)")
    return {names[0]: out_dir}


def embed_catalog(
    client: Client,
    catalog_path: RunPath,
    out_dir: RunPath | Mapping[str, RunPath],
    cfg: EmbedConfig,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    gpu: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    max_failed_fraction: float | None = None,
) -> EmbedCounts:
    """Embed every partition of ``catalog_path`` not yet complete in ``out_dir``; return stage counts.

    ``out_dir`` is the dataset directory of a one-backbone config, or a mapping backbone -> directory for every
    backbone of ``cfg`` (in ``cfg.backbone_names`` order): a partition's task decodes each clip once for all
    the backbones whose part is missing. Counts cover every partition (``failed``, ``warnings``, ``videos``),
    those already complete included, read from the first backbone that has work in it (the main one's part when
    none has); ``embedded`` and ``skipped`` split the ok rows between this call and earlier ones. With
    ``max_failed_fraction`` the stage raises :class:`TooManyFailures` as soon as more than that share of the
    catalog's clips are error rows. With ``gpu`` the tasks need a ``GPU`` worker resource, so they run only
    on GPU workers. ``storage_options`` are the data's (for remote clips); they go to the tasks, never into
    keys or files.
    """
    dirs = _out_dirs(out_dir, cfg)
    outs = list(dirs.values())
    main_dir = outs[0]  # where the counts of parts no backbone has work in are read
    every = [pin_weights(client, one, gpu=gpu) for one in embed_settings_all(cfg)]
    hashes = [_result_hash(one) for one in every]
    for path in outs:
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
    catalog = read_parquet(catalog_path, columns=[c for c in (PARTITION, VIDEO_ID, PATH, STAMP)
                                                  if c in read_schema(catalog_path).names])
    groups = {int(p): rows for p, rows in catalog.groupby(PARTITION, sort=True)}
    sizes = pd.Series({p: len(rows) for p, rows in groups.items()}, dtype=np.int64)
    rows_hashes = {p: _rows_hash(rows) for p, rows in groups.items()}
    # Per backbone: the partitions whose part is missing, and those of them its moved-aside parts can fill.
    pending: list[set[int]] = []
    copies: list[dict[int, Any]] = []
    for out, result_hash in zip(outs, hashes, strict=True):
        missing = {p for p in groups if not _is_complete(part_path(out, p), result_hash, rows_hashes[p])}
        copies.append(plan_copies(out, result_hash, {p: groups[p] for p in sorted(missing)}, set(groups)))
        _remove_foreign_parts(out, set(groups))  # after planning: the copies may come from them
        pending.append(missing)
    todo_set = set().union(*pending)
    todo = sorted(todo_set)
    done_parts = [part_path(main_dir, p) for p in groups if p not in todo_set]
    total = int(sizes.loc[todo].sum()) if todo else 0
    log.info("embed: %d partitions (%d videos) to run for %s, %d videos already embedded", len(todo), total,
             list(dirs), int(sizes.sum()) - total)
    tally = _Tally(int(sizes.sum()), len(sizes), max_failed_fraction)
    token = path_token(main_dir)
    with closing(iter(_count_skipped(client, done_parts, token))) as skipped:
        for part in skipped:
            tally.add(part, skipped=True)
    tally.check(main_dir)
    futures, counted = [], set()  # one task per partition carries its counts: the embed task, else the first copy
    for p in todo:
        embed = [b for b, missing in enumerate(pending) if p in missing and p not in copies[b]]
        if embed:
            futures.append(client.submit(
                embed_catalog_partition,
                catalog_path,
                p,
                [part_path(outs[b], p) for b in embed],
                [every[b] for b in embed],
                dict(storage_options or {}),
                key=f"embed-{p:05d}-{_task_hash([hashes[b] for b in embed])[:8]}-{token}",
                retries=cfg.retries,
                pure=False,
                resources=gpu_resources(gpu),
            ))
            counted.add(futures[-1].key)
        for b, missing in enumerate(pending):
            if p in missing and p in copies[b]:
                out = outs[b]
                futures.append(client.submit(
                    _copy_part, copies[b][p], part_path(out, p),
                    _file_metadata(every[b], rows_hashes[p], len(groups[p]), _clips(groups[p])),
                    key=f"embed-copy-{p:05d}-{hashes[b][:8]}-{path_token(out)}", retries=cfg.retries, pure=False))
                if not embed and b == min(b2 for b2, m in enumerate(pending) if p in m):
                    counted.add(futures[-1].key)
    start, done = time.monotonic(), 0
    # Ctrl-C, SIGTERM, a cancelled run, a failed partition or too many failures: closing the results cancels the
    # queued partitions now. Otherwise the workers go on embedding until the client closes, seconds later.
    # Each future is released once read: a worker lost later costs only the partitions it has in flight.
    with closing(iter(results_as_completed(client, futures, with_keys=True))) as results:
        for key, part in results:
            if key not in counted:
                continue
            tally.add(part, skipped=False)
            done += part["videos"]
            tally.check(main_dir)
            if progress is not None:
                progress(done, total, time.monotonic() - start)
    for out in outs:
        # A worker killed mid-write leaves its temporary file; its task was retried elsewhere, and every task of
        # this call has finished, so nothing is still writing here: leave the directory clean, not at next start.
        remove_stale_temps(out)
        drop_reused(out)  # every part made from the moved-aside ones is written
    return tally.counts
