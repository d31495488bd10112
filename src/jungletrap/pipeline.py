"""The pipeline: run stages in order, skip the ones already done for the same config, record everything.

Each stage reads only the artifacts of earlier stages and writes its own under the run directory. A stage's
config hash chains the hashes of the stages before it, so changing e.g. the backbone re-runs embed and
everything after it, while changing only the head re-runs train and ensemble.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client

from jungletrap.catalog import CATALOG_NAME, build_catalog, write_catalog
from jungletrap.cluster import ClusterInfo
from jungletrap.config import STAGES, JobConfig, config_hash, save_config
from jungletrap.embed import embed_catalog
from jungletrap.ensemble import run_ensemble
from jungletrap.features import FEATURES_DIR, build_features
from jungletrap.manifest import Manifest
from jungletrap.report import write_report
from jungletrap.train import embed_dir, run_train

__all__ = ["run_pipeline", "stage_hashes", "check_run_dir", "StageContext", "STAGES"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    client: Client
    cfg: JobConfig
    run_dir: Path
    info: ClusterInfo


def _file_stamp(path: str | None) -> list[Any]:
    if not path or not os.path.exists(path):
        return [path, None]
    st = os.stat(path)
    return [path, st.st_size, int(st.st_mtime)]


def stage_hashes(cfg: JobConfig) -> dict[str, str]:
    """Config hash per stage, each chained to the previous stage's hash."""
    parts: dict[str, Any] = {
        "catalog": {"data": cfg.data.model_dump(mode="json"), "catalog": cfg.catalog.model_dump(mode="json"),
                    "seed": cfg.run.seed, "labels": _file_stamp(cfg.data.labels),
                    "format": _file_stamp(cfg.data.submission_format)},
        "embed": {k: v for k, v in cfg.embed.model_dump(mode="json").items()
                  if k not in ("batch_size", "prefetch_videos", "decode_timeout_s", "retries", "device")},
        "features": cfg.features.model_dump(mode="json"),
        "train": {"train": cfg.train.model_dump(mode="json"), "seed": cfg.run.seed},
        "ensemble": cfg.ensemble.model_dump(mode="json"),
    }
    hashes, previous = {}, ""
    for stage in STAGES:
        previous = config_hash({"previous": previous, "this": parts[stage]})
        hashes[stage] = previous
    return hashes


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that exists but is not a directory (before any work)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} exists and is not a directory")


def _progress(done: int, total: int, seconds: float) -> None:
    rate = done / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    log.info("embed: %d/%d videos, %.2f videos/s, ETA %.0f s", done, total, rate, eta)


def _catalog(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    catalog = build_catalog(ctx.cfg.data, ctx.cfg.catalog, seed=ctx.cfg.run.seed)
    write_catalog(catalog, ctx.run_dir / CATALOG_NAME)
    counts = catalog["split"].value_counts().to_dict()
    counts["missing_files"] = int((catalog["size_bytes"] < 0).sum())
    counts["partitions"] = int(catalog["partition"].nunique())
    return counts, [CATALOG_NAME]


def _embed(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    out = embed_dir(ctx.cfg, ctx.run_dir)
    counts = embed_catalog(ctx.client, ctx.run_dir / CATALOG_NAME, out, ctx.cfg.embed, progress=_progress,
                           gpu=ctx.info.gpu)
    log.info("embed: %d embedded, %d skipped (already done), %d failed", counts["embedded"], counts["skipped"],
             counts["failed"])
    return counts, [str(out.relative_to(ctx.run_dir))]


def _features(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    counts = build_features(ctx.client, embed_dir(ctx.cfg, ctx.run_dir), ctx.run_dir / FEATURES_DIR,
                            ctx.cfg.features)
    return counts, [FEATURES_DIR]


def _train(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    scores = run_train(ctx.client, ctx.cfg, ctx.run_dir, gpu=ctx.info.gpu)
    outputs = [f"{kind}/{m}.parquet" for m in ctx.cfg.train.models for kind in ("oof", "test")]
    return {f"{m}_oof_log_loss": s for m, s in scores.items()}, outputs


def _ensemble(ctx: StageContext) -> tuple[dict[str, Any], list[str]]:
    counts = run_ensemble(ctx.cfg, ctx.run_dir)
    write_report(ctx.run_dir, embed_dir(ctx.cfg, ctx.run_dir))
    return counts, ["submission.csv", "metrics.json", "report.html"]


_RUNNERS: dict[str, Callable[[StageContext], tuple[dict[str, Any], list[str]]]] = {
    "catalog": _catalog,
    "embed": _embed,
    "features": _features,
    "train": _train,
    "ensemble": _ensemble,
}


def run_pipeline(ctx: StageContext, *, stages: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run ``stages`` (default: all, in order); return each stage's counts. Ctrl-C is recorded, then re-raised."""
    check_run_dir(ctx.run_dir)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(ctx.cfg, ctx.run_dir / "config.yaml")
    manifest = Manifest(ctx.run_dir)
    hashes = stage_hashes(ctx.cfg)
    results: dict[str, Any] = {}
    for stage in stages or list(STAGES):
        if not force and manifest.is_done(stage, hashes[stage]):
            log.info("%s: already done for this config, skipped", stage)
            results[stage] = {**(manifest.stage(stage).counts if manifest.stage(stage) else {}), "stage_skipped": True}
            continue
        log.info("%s: starting", stage)
        manifest.start(stage, hashes[stage])
        try:
            counts, outputs = _RUNNERS[stage](ctx)
        except KeyboardInterrupt:
            manifest.finish(stage, status="interrupted", error="interrupted by the user")
            manifest.record_event(f"{stage} interrupted")
            raise
        except Exception as err:
            manifest.finish(stage, status="failed", error=f"{type(err).__name__}: {err}")
            raise
        manifest.finish(stage, status="done", counts=counts, outputs=outputs)
        results[stage] = counts
        log.info("%s: done %s", stage, counts)
    return results
