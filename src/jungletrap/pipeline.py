"""The pipeline: run stages in order, skip the ones already done for the same config, record everything.

Each stage reads only the artifacts of earlier stages and writes its own under the run directory. A stage's
config hash chains the hashes of the stages before it, so changing e.g. the backbone re-runs embed and
everything after it, while changing only the head re-runs train and ensemble. Hashed is what changes results
(see :func:`stage_hashes`): the input files' stamps and every clip's, but not the evaluation-only test labels
before the ensemble stage, nor the partition sizes after the embed stage.

Monitoring: every stage that runs writes Dask's performance report (task stream, worker profile, bandwidth) to
``perf/<stage>.html`` in the run directory, and the embed stage reports done/total videos, rate and ETA (a
log line per finished partition; a live ``rich`` bar instead when stderr is a terminal). A run can be
cancelled cooperatively (``StageContext.cancelled``, checked between stages and after each embed partition):
the manifest then marks the stage ``cancelled``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from distributed import Client, performance_report
from pydantic import ValidationError

from jungletrap.catalog import CATALOG_NAME, InputError, Inputs, build_catalog, read_inputs, write_catalog
from jungletrap.cluster import ClusterInfo, explain_lost_workers
from jungletrap.config import STAGES, JobConfig, config_hash, save_config
from jungletrap.embed import embed_catalog
from jungletrap.ensemble import run_ensemble
from jungletrap.features import FEATURE_TRANSFORM, FEATURES_DIR, build_features
from jungletrap.lineage import stage_lineage
from jungletrap.manifest import Manifest
from jungletrap.report import write_report
from jungletrap.schema import SPLIT, SPLIT_TRAIN, VIDEO_ID
from jungletrap.storage import RunPath, file_stamp, is_remote, read_parquet, run_path, write_bytes_atomic
from jungletrap.train import embed_dir, embed_dirs, model_names, run_train
from jungletrap.udfs.embed import EMBED_SCHEMA_VERSION
from jungletrap.udfs.features import FEATURE_SET_VERSION

__all__ = ["run_pipeline", "stage_hashes", "check_run_dir", "StageContext", "STAGES", "RunCancelled",
           "EmbedProgress", "format_progress", "PERF_DIR", "LAYOUT_KEYS"]

log = logging.getLogger(__name__)

PERF_DIR = "perf"


class RunCancelled(CancelledError):
    """The run was cancelled (``jungletrap cancel``); the stage in progress is recorded as ``cancelled``."""


@dataclass(frozen=True)
class StageContext:
    """What every stage gets. ``cancelled``, when given, is polled between stages and embed partitions."""

    client: Client
    cfg: JobConfig
    run_dir: RunPath
    info: ClusterInfo
    cancelled: Callable[[], bool] | None = None
    inputs: Inputs | None = None  # the checked input files and videos listing, read once by run_pipeline

    def __post_init__(self) -> None:
        # A URL (or a path given as text) becomes a path object carrying the run's storage options.
        object.__setattr__(self, "run_dir", run_path(self.run_dir, self.cfg.run.storage_options))

    def check_cancelled(self, where: str) -> None:
        """Raise :class:`RunCancelled` when the run has been cancelled."""
        if self.cancelled is not None and self.cancelled():
            raise RunCancelled(f"run cancelled ({where})")


#: Catalog keys that only cut the rows into partitions: no row's embedding, feature or prediction depends on them.
LAYOUT_KEYS = ("videos_per_partition", "partition_bytes")


def _clips_hash(cfg: JobConfig) -> str | None:
    try:
        return read_inputs(cfg.data).clips_hash()
    except (InputError, OSError):  # inputs that cannot be read: the catalog stage reports them, if it runs
        return None


def stage_hashes(cfg: JobConfig, *, clips: str | None = None) -> dict[str, str]:
    """Config hash per stage, each chained to the previous stage's hash; hashed is what changes results.

    ``clips`` is :meth:`jungletrap.catalog.Inputs.clips_hash` (every clip's name and size + version stamp, so
    a replaced clip re-runs the stages from the catalog on; only its partition is embedded again); without
    it the videos root is listed here. ``data.test_labels`` only scores the test set: it enters the ensemble
    stage alone. The partition sizes (:data:`LAYOUT_KEYS`) enter the catalog and embed stages only: rows and
    their order are the same however they are cut (partitions are contiguous runs of catalog rows), and the
    embed stage then rewrites its parts by copying rows, not decoding.
    """
    storage = cfg.data.storage_options
    data = {k: v for k, v in cfg.public_dump()["data"].items() if k != "test_labels"}
    catalog = cfg.catalog.model_dump(mode="json")
    layout = {k: catalog.pop(k) for k in LAYOUT_KEYS}
    parts: dict[str, Any] = {
        "catalog": {"data": data, "catalog": catalog, "seed": cfg.run.seed,
                    "labels": file_stamp(cfg.data.labels, storage),
                    "format": file_stamp(cfg.data.submission_format, storage),
                    "clips": _clips_hash(cfg) if clips is None else clips},
        "embed": {"schema": EMBED_SCHEMA_VERSION,
                  **{k: v for k, v in cfg.embed.model_dump(mode="json").items()
                     if k not in ("batch_size", "prefetch_videos", "decode_threads", "decode_processes",
                                  "codec_threads", "decode_timeout_s", "retries", "device", "runtime")
                     and not (k == "backbones" and v is None)}},  # one backbone: hashes as before the key
        "features": {"version": FEATURE_SET_VERSION, **cfg.features.model_dump(mode="json")},
        "train": {"train": cfg.train.model_dump(mode="json"), "seed": cfg.run.seed},
        "ensemble": {**cfg.ensemble.model_dump(mode="json"),
                     "test_labels": file_stamp(cfg.data.test_labels, storage)},
    }
    hashes, previous = {}, ""
    for stage in STAGES:
        previous = config_hash({"previous": previous, "this": parts[stage]})
        hashes[stage] = previous
    for stage in ("catalog", "embed"):  # the stages whose files are cut by partition
        hashes[stage] = config_hash({"results": hashes[stage], "layout": layout})
    return hashes


def check_run_dir(run_dir: RunPath) -> None:
    """Refuse a run directory that exists but is not a directory (before any work)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} exists and is not a directory")


def format_progress(done: int, total: int, seconds: float) -> str:
    """``done/total videos (pct), rate, ETA`` as one line, e.g. ``32/120 videos (27%), 4.10 videos/s, ETA 0:21``."""
    rate = done / seconds if seconds > 0 else 0.0
    pct = 100.0 * done / total if total else 100.0
    if done >= total:
        eta = "done"
    elif rate > 0:
        minutes, secs = divmod(int(round((total - done) / rate)), 60)
        eta = f"ETA {minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"ETA {minutes}:{secs:02d}"
    else:
        eta = "ETA ?"
    return f"{done}/{total} videos ({pct:.0f}%), {rate:.2f} videos/s, {eta}"


class EmbedProgress:
    """Embed progress: a log line per finished partition, or a live ``rich`` bar when stderr is a terminal.

    Called by :func:`jungletrap.embed.embed_catalog` with (videos done, videos to do, seconds since start).
    ``check`` runs after every update (it raises to stop the stage, e.g. on cancellation).
    """

    def __init__(self, *, live: bool | None = None, check: Callable[[], None] | None = None) -> None:
        self.live = sys.stderr.isatty() if live is None else live
        self.check = check
        self.last = ""
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int, seconds: float) -> None:
        self.last = format_progress(done, total, seconds)
        if self.live:
            self._update_bar(done, total, done / seconds if seconds > 0 else 0.0)
        else:
            log.info("embed: %s", self.last)
        if self.check is not None:
            self.check()

    def _update_bar(self, done: int, total: int, rate: float) -> None:
        if self._bar is None:
            import rich.progress as rp
            from rich.console import Console

            self._bar = rp.Progress(rp.TextColumn("embed"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TextColumn("videos"), rp.TaskProgressColumn(),
                                    rp.TextColumn("{task.fields[rate]}"), rp.TimeRemainingColumn(),
                                    console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("embed", total=total, rate="")
        self._bar.update(self._task, completed=done, total=total, rate=f"{rate:.2f} videos/s")

    def close(self) -> None:
        """Stop the live bar (if any) and log the last state once."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.live and self.last:
            log.info("embed: %s", self.last)


@contextlib.contextmanager
def _perf_report(ctx: StageContext, stage: str) -> Iterator[None]:
    """Write Dask's performance report of the stage to ``perf/<stage>.html``; a report that fails only warns.

    The page carries Bokeh's JavaScript inline (``mode="inline"``, about 1 MB more), so it opens on an
    air-gapped cluster or without internet; the default loads it from a CDN and shows a blank page there.
    """
    path = ctx.run_dir / PERF_DIR / f"{stage}.html"
    report: performance_report | None = None
    with ctx.client.as_current(), tempfile.TemporaryDirectory(prefix="jungletrap-perf-") as tmp:
        local = Path(tmp) / path.name  # Dask writes a local file; it is then put in the run directory
        try:
            opened = performance_report(filename=str(local), mode="inline")  # Bokeh inside: opens offline
            opened.__enter__()
            report = opened
        except Exception as err:  # the report is a diagnostic: never fail the stage for it
            log.warning("%s: no performance report (%s: %s)", stage, type(err).__name__, err)
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C/SIGTERM: stop now; building the report takes the scheduler seconds
            report = None
            raise
        finally:
            if report is not None:
                try:
                    report.__exit__(None, None, None)
                    write_bytes_atomic(local.read_bytes(), path)
                except Exception as err:
                    log.warning("%s: performance report not written (%s: %s)", stage, type(err).__name__, err)


def _catalog(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    catalog = build_catalog(ctx.cfg.data, ctx.cfg.catalog, seed=ctx.cfg.run.seed, inputs=ctx.inputs)
    write_catalog(catalog, ctx.run_dir / CATALOG_NAME)
    counts = catalog["split"].value_counts().to_dict()
    counts["missing_files"] = int((catalog["size_bytes"] < 0).sum())
    counts["partitions"] = int(catalog["partition"].nunique())
    return counts, [CATALOG_NAME]


def _embed(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    out = embed_dirs(ctx.cfg, ctx.run_dir)
    progress = EmbedProgress(check=lambda: ctx.check_cancelled("during embed"))
    try:
        counts = embed_catalog(ctx.client, ctx.run_dir / CATALOG_NAME, out, ctx.cfg.embed, progress=progress,
                               gpu=ctx.info.gpu, storage_options=ctx.cfg.data.storage_options,
                               max_failed_fraction=ctx.cfg.run.max_failed_fraction)
    finally:
        progress.close()
    log.info("embed: %d embedded, %d skipped (already done), %d failed, %d with a warning (all parts)",
             counts["embedded"], counts["skipped"], counts["failed"], counts["warnings"])
    return counts, [str(d.relative_to(ctx.run_dir)) for d in out.values()]  # the main backbone's first


def _features(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    catalog = read_parquet(ctx.run_dir / CATALOG_NAME, columns=[VIDEO_ID, SPLIT])
    train_ids = set(catalog.loc[catalog[SPLIT] == SPLIT_TRAIN, VIDEO_ID])
    counts = build_features(ctx.client, embed_dirs(ctx.cfg, ctx.run_dir), ctx.run_dir / FEATURES_DIR,
                            ctx.cfg.features, transform_path=ctx.run_dir / FEATURE_TRANSFORM, fit_ids=train_ids,
                            seed=ctx.cfg.run.seed)
    return counts, [FEATURES_DIR, str(FEATURE_TRANSFORM)]


def _train(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    scores = run_train(ctx.client, ctx.cfg, ctx.run_dir, gpu=ctx.info.gpu)
    outputs = [f"{kind}/{m}.parquet" for m in model_names(ctx.cfg) for kind in ("oof", "test")]
    return {f"{m}_oof_log_loss": s for m, s in scores.items()}, outputs


def _ensemble(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    counts = run_ensemble(ctx.cfg, ctx.run_dir)
    write_report(ctx.run_dir, embed_dir(ctx.cfg, ctx.run_dir), client=ctx.client,
                 storage_options=ctx.cfg.data.storage_options)
    return counts, ["submission.csv", "metrics.json", "report.html"]


_RUNNERS: dict[str, Callable[[StageContext], tuple[dict[str, Any], list[str]]]] = {
    "catalog": _catalog,
    "embed": _embed,
    "features": _features,
    "train": _train,
    "ensemble": _ensemble,
}


#: The config sections whose values a stage's outputs depend on (``run`` and ``cluster`` follow every invocation).
_SECTIONS: dict[str, tuple[str, ...]] = {"catalog": ("data", "catalog"), "embed": ("embed",),
                                         "features": ("features",), "train": ("train",), "ensemble": ("ensemble",)}


def _record_config(ctx: StageContext, stage: str) -> None:
    """Update ``config.yaml`` for a stage about to run: its own sections take this invocation's values, the
    sections of stages that do not run keep those that made their outputs (``jungletrap ensemble --set
    embed.sample_fps=2`` must not record a sampling the embeddings were never made with)."""
    path = ctx.run_dir / "config.yaml"
    current = ctx.cfg.public_dump()
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        merged = JobConfig.model_validate({**saved, "run": current["run"], "cluster": current["cluster"],
                                           **{s: current[s] for s in _SECTIONS[stage]}}) if saved else ctx.cfg
    except (OSError, yaml.YAMLError, TypeError, ValidationError) as err:  # unreadable, or an older version's
        log.warning("%s: not kept (%s); it now records this invocation's config", path, type(err).__name__)
        merged = ctx.cfg
    save_config(merged, path)


def run_pipeline(ctx: StageContext, *, stages: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run ``stages`` (default: all, in order); return each stage's counts. Ctrl-C is recorded, then re-raised.

    The input files are checked against each other first (:class:`jungletrap.catalog.InputError` before any
    work, whichever stages run: a stage skipped as done must not hide that an input changed under it).
    """
    check_run_dir(ctx.run_dir)
    if ctx.inputs is None:
        ctx = replace(ctx, inputs=read_inputs(ctx.cfg.data))
    if not is_remote(ctx.run_dir):  # an object store has no directories to make
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(ctx.run_dir)
    hashes = stage_hashes(ctx.cfg, clips=ctx.inputs.clips_hash())
    results: dict[str, Any] = {}
    for stage in stages or list(STAGES):
        if not force and manifest.is_done(stage, hashes[stage]):
            log.info("%s: already done for this config, skipped", stage)
            results[stage] = {**(manifest.stage(stage).counts if manifest.stage(stage) else {}), "stage_skipped": True}
            continue
        try:
            ctx.check_cancelled(f"before {stage}")
        except RunCancelled:
            manifest.record_event(f"run cancelled before {stage}")
            raise
        log.info("%s: starting", stage)
        _record_config(ctx, stage)
        manifest.start(stage, hashes[stage])
        try:
            with _perf_report(ctx, stage), explain_lost_workers(ctx.client, stage):
                counts, outputs = _RUNNERS[stage](ctx)
            lineage = stage_lineage(stage, ctx.run_dir, manifest, outputs)
        except KeyboardInterrupt:
            manifest.finish(stage, status="interrupted", error="interrupted by the user")
            manifest.record_event(f"{stage} interrupted")
            raise
        except CancelledError as err:  # RunCancelled, or the stage's own tasks cancelled on the cluster
            manifest.finish(stage, status="cancelled", error=f"{type(err).__name__}: {err}")
            manifest.record_event(f"{stage} cancelled")
            raise
        except Exception as err:  # a stage that stops on its own rule (too many failures) leaves its counts
            manifest.finish(stage, status="failed", error=f"{type(err).__name__}: {err}",
                            counts=getattr(err, "counts", None))
            raise
        manifest.finish(stage, status="done", counts=counts, outputs=outputs, lineage=lineage)
        results[stage] = counts
        log.info("%s: done %s", stage, counts)
    return results
