"""Lineage: what each stage's outputs were made from, recorded in the manifest and checked before ``predict``.

``predict`` must embed and featurise new clips exactly as the run's models were trained, and it cannot trust
``config.yaml`` for that (a later invocation with other ``--set`` values records its own). So every stage that
finishes records, in its manifest entry, the facts of its outputs that later stages and ``predict`` rely on:

- embed: the result hash of its parts (:func:`jungletrap.embed.embed_settings`'s numbers, not timeouts);
- features: its parts' settings (feature-set version, pooling, PCA, the embeddings' result hash) and a digest
  of ``models/features.json``;
- train: a digest of every model file under ``models/<model>/``;
- ensemble: a digest of ``models/ensemble.json``;

each chained to the previous stage's record (``after``). :func:`verify_run` recomputes them from the files: a
file changed since its stage wrote it, or a stage re-run after the stages that used its outputs (new
embeddings under models trained on the old ones), makes the run directory inconsistent, and it is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from jungletrap.config import config_hash
from jungletrap.embed import read_embedding_meta
from jungletrap.features import FEATURE_TRANSFORM, FEATURES_DIR, read_features_meta
from jungletrap.manifest import Manifest
from jungletrap.storage import RunPath

__all__ = ["LINEAGE_STAGES", "RunMismatch", "stage_lineage", "verify_run", "embed_parts_dir", "embed_parts_dirs"]

log = logging.getLogger(__name__)

LINEAGE_STAGES: tuple[str, ...] = ("embed", "features", "train", "ensemble")
_MODELS = "models"
_ENSEMBLE = f"{_MODELS}/ensemble.json"


class RunMismatch(ValueError):
    """A run directory whose files are not those its manifest recorded (or that is not a finished run)."""


def _digest(path: RunPath) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def embed_parts_dirs(run_dir: RunPath, manifest: Manifest) -> list[RunPath]:
    """The embedding datasets of the run, as its embed stage recorded them (``embeddings/<backbone>``, the main
    backbone's first)."""
    rec = manifest.stage("embed")
    if rec is None or not rec.outputs:
        raise RunMismatch(f"{run_dir}: its manifest records no embed stage: not a finished run")
    return [run_dir / out for out in rec.outputs]


def embed_parts_dir(run_dir: RunPath, manifest: Manifest) -> RunPath:
    """The main backbone's embedding parts of the run (``embeddings/<backbone>``)."""
    return embed_parts_dirs(run_dir, manifest)[0]


def _first_part(directory: RunPath, what: str) -> RunPath:
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise RunMismatch(f"{directory}: no {what} parts")
    return parts[0]


Observed = tuple[dict[str, Any], dict[str, str]]


def _embed(run_dir: RunPath, datasets: list[RunPath]) -> Observed:
    """The main backbone's result hash and name; with several backbones, every one's result hash too."""
    metas = [read_embedding_meta(_first_part(parts, "embedding")) for parts in datasets]
    values = {"result_hash": metas[0].get("result_hash"), "backbone": metas[0].get("backbone")}
    if len(metas) > 1:
        values["backbones"] = {str(m.get("backbone")): m.get("result_hash") for m in metas}
    return values, {}


def _features(run_dir: RunPath, datasets: list[RunPath]) -> Observed:
    meta = read_features_meta(_first_part(run_dir / FEATURES_DIR, "feature"))
    settings = {k: v for k, v in meta.items() if k not in ("source", "transform")}
    return settings, _files(run_dir, [str(FEATURE_TRANSFORM)])


def _train(run_dir: RunPath, datasets: list[RunPath]) -> Observed:
    models = run_dir / _MODELS
    names = sorted(f"{_MODELS}/{d.name}/{f.name}" for d in models.iterdir() if d.is_dir()
                   for f in d.iterdir() if f.is_file()) if models.is_dir() else []
    return {}, _files(run_dir, names)


def _ensemble(run_dir: RunPath, datasets: list[RunPath]) -> Observed:
    return {}, _files(run_dir, [_ENSEMBLE])


def _files(run_dir: RunPath, names: list[str]) -> dict[str, str]:
    return {name: _digest(run_dir / name) for name in names if (run_dir / name).is_file()}


#: Per stage: (run directory, its embedding datasets) -> (values, file digests) of its outputs.
_OBSERVE: dict[str, Callable[[RunPath, list[RunPath]], Observed]] = {
    "embed": _embed, "features": _features, "train": _train, "ensemble": _ensemble,
}


def _previous_digest(stage: str, manifest: Manifest) -> str | None:
    i = LINEAGE_STAGES.index(stage)
    rec = manifest.stage(LINEAGE_STAGES[i - 1]) if i else None
    return (rec.lineage or {}).get("digest") if rec is not None else None


def stage_lineage(stage: str, run_dir: RunPath, manifest: Manifest, outputs: list[str]) -> dict[str, Any] | None:
    """The lineage record of ``stage``'s outputs as they are now (None for stages ``predict`` does not use);
    ``outputs`` are the stage's own (the embed stage's datasets, one per backbone)."""
    if stage not in _OBSERVE:
        return None
    datasets = [run_dir / out for out in outputs] if stage == "embed" else embed_parts_dirs(run_dir, manifest)
    values, files = _OBSERVE[stage](run_dir, datasets)
    record = {"after": _previous_digest(stage, manifest), "values": values, "files": files}
    return {**record, "digest": config_hash(record)}


def _check_stage(stage: str, run_dir: RunPath, manifest: Manifest, recorded: dict[str, Any]) -> None:
    previous = _previous_digest(stage, manifest)
    if recorded.get("after") != previous:
        before = LINEAGE_STAGES[LINEAGE_STAGES.index(stage) - 1]
        raise RunMismatch(f"{run_dir}: the {stage} stage's outputs were made from other {before} outputs than "
                          f"those in the run directory (the {before} stage ran again afterwards): run the stages "
                          f"after {before} again (`jungletrap run`) before predicting")
    values, files = _OBSERVE[stage](run_dir, embed_parts_dirs(run_dir, manifest))
    for key, value in recorded.get("values", {}).items():
        if values.get(key) != value:
            raise RunMismatch(f"{run_dir}: the {stage} stage recorded {key}={value!r}, its files now say "
                              f"{values.get(key)!r}: they were changed after the stage ran")
    for name in sorted(set(recorded.get("files", {})) | set(files)):
        if recorded.get("files", {}).get(name) != files.get(name):
            state = "is missing" if name not in files else (
                "was not written by it" if name not in recorded.get("files", {}) else "has changed")
            raise RunMismatch(f"{run_dir}: {name} {state} since the {stage} stage ran (recorded digest "
                              f"{recorded.get('files', {}).get(name)}, file {files.get(name)})")


def verify_run(run_dir: RunPath) -> Manifest:
    """The run's manifest, once every stage ``predict`` uses is done and its files are those it recorded.

    Raises :class:`RunMismatch` naming the stage and the file otherwise. A run recorded by an older version
    (no lineage in its manifest) is accepted with a warning: there is nothing to check it against.
    """
    manifest = Manifest(run_dir)
    for stage in LINEAGE_STAGES:
        rec = manifest.stage(stage)
        if rec is None or rec.status != "done":
            state = "never ran" if rec is None else f"is {rec.status}"
            raise RunMismatch(f"{run_dir}: its {stage} stage {state}: not a finished run")
    for stage in LINEAGE_STAGES:
        recorded = manifest.stage(stage).lineage  # type: ignore[union-attr]
        if recorded is None:
            log.warning("%s: the manifest records no lineage for %s (an older version made it): its artifacts "
                        "are used unchecked", run_dir, stage)
            return manifest
        _check_stage(stage, run_dir, manifest, recorded)
    return manifest
