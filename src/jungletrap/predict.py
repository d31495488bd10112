"""Predict: score new videos with a finished run's models, with the run's own embed and feature settings.

Those settings come from the run's artifacts, never from its ``config.yaml`` (which records the last
invocation's values): the sampling and backbone from the embedding parts' metadata, the pooling and PCA from the
feature parts' metadata and ``models/features.json``. The run directory is checked first
(:func:`jungletrap.lineage.verify_run`): one whose files are not those its manifest recorded is refused.

A run with several backbones embeds the new clips with each of them (``<work>/embeddings/<backbone>/``), makes
the same feature table (every backbone's pooled columns) and scores them with every model the blend uses:
``xgb``, ``head`` (the main backbone's) and ``head_<backbone>`` for each other one.

Intermediate artifacts go under ``<run>/predict/<inputs-hash>/`` (so a repeated call reuses its embeddings);
the result has one row per input file: ``filename``, the 24 probabilities, ``top_label``, ``status`` and
``error``. A broken file keeps its row, with the reason and empty probabilities.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.cluster import cluster_has_gpu
from jungletrap.config import EmbedConfig, FeaturesConfig, JobConfig, config_hash, load_config
from jungletrap.embed import RESULT_KEYS, embed_catalog, embed_settings, read_embedding_meta, result_hash
from jungletrap.ensemble import ENSEMBLE_MODEL, blend_frames
from jungletrap.features import FEATURE_TRANSFORM, FEATURES_DIR, build_features, read_features_meta
from jungletrap.lineage import RunMismatch, embed_parts_dirs, verify_run
from jungletrap.manifest import Manifest
from jungletrap.schema import (
    CLASS_NAMES,
    ERROR,
    FILENAME,
    STATUS,
    STATUS_OK,
    TOP_LABEL,
    VIDEO_ID,
)
from jungletrap.storage import (
    RunPath,
    filesystem,
    is_remote,
    list_files,
    read_parquet,
    run_path,
    write_text_atomic,
)
from jungletrap.train import HEAD, head_model_name
from jungletrap.train_head import predict_head_models
from jungletrap.udfs.features import FEATURE_SET_VERSION
from jungletrap.weights import ResolvedWeights
from jungletrap.xgb import predict_xgb_models

__all__ = ["predict_videos", "list_videos", "score_embedded", "trained_settings", "RunMismatch"]

log = logging.getLogger(__name__)


def list_videos(videos: str | os.PathLike[str], extensions: list[str],
                storage_options: Mapping[str, Any] | None = None) -> tuple[str, pd.DataFrame]:
    """A single file as given, or every file under a directory whose extension looks like a video (one listing).

    Returns the root the ids are relative to and the files (``relpath``, ``path``, ``size_bytes``, ``version``).
    """
    fs, where = filesystem(videos, storage_options)
    local = not is_remote(videos)
    if (os.path.lexists(where) and not os.path.isdir(where)) if local else fs.isfile(where):
        listing = list_files(videos, storage_options)
        if listing.empty:  # a broken symlink lists as nothing: keep it, its row becomes an error
            listing = pd.DataFrame({"relpath": [os.path.basename(where)], "path": [where], "size_bytes": [-1],
                                    "version": ["0"]})
        return str(listing["path"].iloc[0]).rsplit("/", 1)[0], listing
    if not fs.isdir(where):
        raise FileNotFoundError(f"{videos}: no such file or directory")
    exts = {e.lower() for e in extensions}
    listing = list_files(videos, storage_options)
    keep = listing["relpath"].map(lambda rel: os.path.splitext(rel)[1].lower() in exts)
    root = where if local else fs.unstrip_protocol(where.rstrip("/"))
    return root, listing[keep].reset_index(drop=True)


def _first_part(directory: RunPath) -> RunPath:
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise RunMismatch(f"{directory}: no parts: not a finished run")
    return parts[0]


def trained_settings(run_dir: RunPath, cfg: JobConfig) -> tuple[EmbedConfig, FeaturesConfig]:
    """The embed and feature settings the run's models were trained with, read from its artifacts.

    ``cfg`` (the run's ``config.yaml``) gives only what does not change a number (batch size, decoders,
    device). With several backbones every one's parts are read and checked. Raises :class:`RunMismatch` when
    the run directory is inconsistent or made by another version.
    """
    manifest = verify_run(run_dir)
    parts = [_first_part(d) for d in embed_parts_dirs(run_dir, manifest)]
    metas = [read_embedding_meta(part) for part in parts]
    recorded = metas[0].get("settings", {})
    names = [str(m.get("settings", {}).get("backbone", m.get("backbone"))) for m in metas]
    values = {**cfg.embed.model_dump(), **{k: recorded[k] for k in RESULT_KEYS if k in recorded}}
    if len(names) > 1:
        values.update(backbone=names[0], backbones=names,
                      weights={n: m.get("settings", {}).get("weights") for n, m in zip(names, metas, strict=True)})
    else:
        values.update(backbones=None, **({"weights": recorded["weights"]} if "weights" in recorded else {}))
    embed = EmbedConfig.model_validate(values)
    for name, part, meta in zip(names, parts, metas, strict=True):
        pinned = ResolvedWeights(**meta["weights"]) if meta.get("weights") else None
        if result_hash(replace(embed_settings(embed, name), pinned_weights=pinned)) != meta.get("result_hash"):
            raise RunMismatch(f"{part}: its recorded settings {meta.get('settings', {})} do not give its result "
                              f"hash {meta.get('result_hash')}: written by another version, or edited")
    meta = metas[0]
    features = read_features_meta(_first_part(run_dir / FEATURES_DIR))
    if features.get("feature_set_version") != FEATURE_SET_VERSION:
        raise RunMismatch(f"{run_dir / FEATURES_DIR}: feature set version {features.get('feature_set_version')}, "
                          f"this version computes {FEATURE_SET_VERSION}: predict with the version that trained it")
    if features.get("embed_result_hash", meta.get("result_hash")) != meta.get("result_hash"):
        raise RunMismatch(f"{run_dir / FEATURES_DIR}: made from other embeddings than those in {parts[0].parent}")
    others = {name: info.get("embed_result_hash") for name, info in features.get("other_backbones", {}).items()}
    if others != {n: m.get("result_hash") for n, m in zip(names[1:], metas[1:], strict=True)}:
        raise RunMismatch(f"{run_dir / FEATURES_DIR}: made from the backbones {[names[0], *others]}, but the run's "
                          f"embed stage holds {names} (or other embeddings of them): run the stages after embed "
                          "again before predicting")
    pooled = FeaturesConfig.model_validate({**cfg.features.model_dump(), "pooling": features["pooling"],
                                            "pca_components": features["pca_components"]})
    return embed, pooled


def _check_same_embedder(run_dir: RunPath, predict_dirs: Mapping[str, RunPath]) -> None:
    """The new clips were embedded as the training clips were: same settings and the same weights' bytes, for
    every backbone.

    The weights are resolved again on the workers that embed the new clips; a file replaced since training (same
    path, other content) gives another result hash, and the models would score embeddings they never saw.
    """
    trained_dirs = embed_parts_dirs(run_dir, Manifest(run_dir))
    for trained_dir, predict_dir in zip(trained_dirs, predict_dirs.values(), strict=True):
        trained = read_embedding_meta(_first_part(trained_dir))
        now = read_embedding_meta(_first_part(predict_dir))
        if now.get("result_hash") != trained.get("result_hash"):
            raise RunMismatch(f"{predict_dir}: the new clips were embedded with other weights or settings than the "
                              f"run's models were trained on (weights now {now.get('weights')}, trained with "
                              f"{trained.get('weights')})")


def _xgb_proba(client: Client, run_dir: RunPath, features_dir: RunPath, index: pd.Index) -> pd.DataFrame:
    return predict_xgb_models(client, run_dir / "models" / "xgb", features_dir).loc[index]


def _head_proba(run_dir: RunPath, embed_dir: RunPath, features_dir: RunPath, index: pd.Index, *,
                model: str = HEAD) -> pd.DataFrame:
    """The fold heads' mean probabilities, streamed from the parts (one part and one batch in memory at a time);
    ``embed_dir`` holds the embeddings of the backbone ``model`` was trained on."""
    return predict_head_models(run_dir / "models" / model, embed_dir, features_dir).loc[index]


def score_embedded(client: Client, run_dir: RunPath, embed_dirs: Mapping[str, RunPath], work: RunPath,
                   features_cfg: FeaturesConfig, index: pd.Index) -> pd.DataFrame:
    """The run's clipped blend over clips already embedded with every backbone of the run (``embed_dirs``, the
    main one first): their features (``<work>/features``, the run's fitted transform), then each model the
    blender uses, one at a time."""
    main = next(iter(embed_dirs))
    heads = {head_model_name(b, main): d for b, d in embed_dirs.items()}
    blender = json.loads((run_dir / ENSEMBLE_MODEL).read_text(encoding="utf-8"))
    unknown = [m for m in blender["models"] if m != "xgb" and m not in heads]
    if unknown:
        raise RunMismatch(f"{run_dir}: the blend uses {unknown}, made from backbones not among {list(embed_dirs)}")
    features_dir = work / FEATURES_DIR
    build_features(client, embed_dirs, features_dir, features_cfg, transform_path=run_dir / FEATURE_TRANSFORM)

    def proba(model: str) -> pd.DataFrame:
        if model == "xgb":
            return _xgb_proba(client, run_dir, features_dir, index)
        return _head_proba(run_dir, heads[model], features_dir, index, model=model)

    blended = blend_frames(blender, [proba(m) for m in blender["models"]])
    clip = float(blender["clip"])
    return blended.clip(clip, 1 - clip)


def predict_videos(
    client: Client,
    run_dir: str | Path | RunPath,
    videos: str | Path,
    *,
    out: str | Path | None = None,
    proba_threshold: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Embed, featurise and score ``videos`` with the models of ``run_dir``; optionally write a CSV.

    ``run_dir``, ``videos`` and ``out`` may each be a local path or an fsspec URL; ``storage_options`` apply to
    the remote ones (credentials: the environment or a profile on the workers).
    """
    options = dict(storage_options or {})
    run_dir = run_path(run_dir, options)
    cfg: JobConfig = load_config(run_dir / "config.yaml")
    embed_cfg, features_cfg = trained_settings(run_dir, cfg)
    root, listing = list_videos(videos, cfg.catalog.extensions, options)  # workers get absolute paths or URLs
    if listing.empty:
        raise FileNotFoundError(f"{videos}: no video files found (extensions {cfg.catalog.extensions})")
    catalog = catalog_from_paths(listing["path"].tolist(), root, videos_per_partition=cfg.catalog.videos_per_partition,
                                 sizes=listing["size_bytes"].tolist(), partition_bytes=cfg.catalog.partition_bytes,
                                 versions=listing["version"].astype(str).tolist())
    stamp = config_hash({"paths": listing["path"].tolist(), "sizes": listing["size_bytes"].tolist(),
                         "versions": listing["version"].tolist()})
    work = run_dir / "predict" / stamp
    write_catalog(catalog, work / "catalog.parquet")
    embed_dirs = {name: work / "embeddings" / name for name in embed_cfg.backbone_names}
    embed_catalog(client, work / "catalog.parquet", embed_dirs, embed_cfg, gpu=cluster_has_gpu(client),
                  storage_options=options)
    _check_same_embedder(run_dir, embed_dirs)
    index = pd.Index(catalog[VIDEO_ID])
    proba = score_embedded(client, run_dir, embed_dirs, work, features_cfg, index)
    status = read_parquet(work / FEATURES_DIR, columns=[VIDEO_ID, STATUS, ERROR]).set_index(VIDEO_ID).loc[index]
    result = _result(catalog, proba, status, proba_threshold)
    if out is not None:
        write_text_atomic(result.to_csv(index=False, float_format="%.6g"), run_path(out, options))
    return result


def _result(catalog: pd.DataFrame, proba: pd.DataFrame, status: pd.DataFrame,
            threshold: float | None) -> pd.DataFrame:
    ok = (status[STATUS] == STATUS_OK).to_numpy()
    values = proba.to_numpy(np.float64, copy=True)
    values[~ok] = np.nan
    result = pd.DataFrame(values, columns=list(CLASS_NAMES))
    result.insert(0, FILENAME, catalog[FILENAME].to_numpy())
    top = np.array(CLASS_NAMES, dtype=object)[np.nan_to_num(values, nan=-1).argmax(axis=1)]
    result[TOP_LABEL] = np.where(ok, top, None)
    result[STATUS] = status[STATUS].to_numpy()
    result[ERROR] = status[ERROR].to_numpy()
    if threshold is not None:
        result["labels"] = [";".join(c for c, p in zip(CLASS_NAMES, row, strict=True) if p >= threshold)
                            if k else None for row, k in zip(values, ok, strict=True)]
    return result
