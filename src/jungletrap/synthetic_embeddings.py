"""Rehearsal data without decoding: a finished catalog and embed stage for N synthetic clips.

Why: the job exists for 200k+ clips (~1 TB), and proving that every stage after embed scales must not need
200k decoded videos. :func:`write_rehearsal` writes, under one run directory, exactly what ``jungletrap
catalog`` and ``jungletrap embed`` would have left there: the competition's label files, ``catalog.parquet``,
``embeddings/<backbone>/part-NNNNN.parquet`` and ``manifest.json`` records of both stages, plus the
resolved ``config.yaml`` they match, so ``jungletrap run --config RUN_DIR/config.yaml`` goes on from features.

Nothing is spelled twice: parts are written with the embed stage's own schema (``EMBED_SCHEMA``), file
metadata (``_file_metadata``/``_rows_hash``), part names and settings (``embed_settings``), and the manifest
records carry the pipeline's ``stage_hashes`` of the reloaded config. One Dask task per catalog partition
generates and writes its part; the client holds only per-clip scalars (labels, sizes, flags).

The data: labels follow the competition's imbalance (about 55 % blank, chimpanzee the commonest animal, many
classes under 0.1 %; shares approximated from the competition's training labels, rounded), a few percent of
clips carry two labels, 30 % of clips are the test split. Each class has a fixed direction in embedding space
that is added to the frames of a window where the animal is in view, over a per-clip scene vector and frame
noise, so pooled embeddings are informative but not separable; container and pixel columns carry class signal
too (motion and file size grow with animals, night clips are dark and grey). About 1 % of clips have one
sampled frame, 10 % are shorter than the sampling window, and 0.3 % (at least one) are error rows.

Backbone recorded: the registered backbone whose feature size is ``dim`` (1280: ``efficientnet_lite0``, the
default; 3840: ``resnet152_skip``; 64: ``tiny_cnn`` for tests). Any other size is refused: the file metadata
states the backbone's ``feature_dim``, which the features stage trusts, so a made-up size would make parts
that no real embed run can produce. Frames: ``embed.sample_fps`` 3 and ``embed.max_seconds`` ``frames / 3``
(the competition's 3 fps x 15 s for 45).

Several backbones (``backbones``, ``--backbones a,b``): ``embeddings/<backbone>/`` for each, with the same parts,
rows, container and pixel columns, each backbone at its registered feature size and ``config.yaml`` naming them
in ``embed.backbones`` (the first is the main one). The main backbone's parts are those a single-backbone run of
the same size and seed writes; each other backbone sees the same animals in the same frames, but along its own
class directions and with its own scene and frame noise, so its pooled embeddings carry the same signal with
independent errors (blending the backbones' models helps).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client, as_completed

from jungletrap.backbones import BACKBONES
from jungletrap.catalog import CATALOG_NAME, assign_folds, assign_partitions, write_catalog
from jungletrap.config import JobConfig, load_config, save_config
from jungletrap.embed import _clips, _file_metadata, _rows_hash, embed_settings, part_path
from jungletrap.manifest import Manifest
from jungletrap.schema import (
    CLASS_NAMES,
    EMBEDDING,
    ERROR,
    FILENAME,
    FOLD,
    N_FRAMES,
    PARTITION,
    PATH,
    PIXEL_COLUMNS,
    SIZE_BYTES,
    SPLIT,
    SPLIT_TEST,
    SPLIT_TRAIN,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    VIDEO_ID,
)
from jungletrap.storage import path_token, read_parquet, write_parquet_atomic
from jungletrap.udfs.embed import EMBED_SCHEMA, EmbedSettings
from jungletrap.weights import resolve_weights

__all__ = ["CLASS_SHARES", "RehearsalSpec", "backbone_for_dim", "rehearsal_config", "write_rehearsal",
           "generate_part"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
#: Share of training clips whose main label is each class: the competition's imbalance, rounded.
CLASS_SHARES: dict[str, float] = {
    "blank": 0.55, "chimpanzee": 0.14, "human": 0.07, "other (primate)": 0.06, "duiker": 0.06,
    "elephant": 0.025, "bird": 0.015, "rodent": 0.014, "hog": 0.01, "other (non-primate)": 0.009,
    "porcupine": 0.004, "small antelope": 0.003, "gorilla": 0.003, "forest buffalo": 0.0025,
    "large ungulate": 0.002, "leopard": 0.0015, "cattle": 0.0015, "hippopotamus": 0.001, "small cat": 0.0006,
    "pangolin": 0.0005, "reptile": 0.0004, "wild dog": 0.0003, "hyena": 0.0002, "lion": 0.0001,
}  # fmt: skip
TEST_SHARE = 0.3  # the competition: ~200k labelled clips, ~87k to predict
SECOND_LABEL_SHARE = 0.06  # of animal clips
ERROR_SHARE, ONE_FRAME_SHARE, SHORT_SHARE, NIGHT_SHARE = 0.003, 0.01, 0.10, 0.3
SAMPLE_FPS = 3.0
_BLANK = CLASS_NAMES.index("blank")
_RESOLUTIONS, _RESOLUTION_P = ((640, 360), (1280, 720), (960, 540)), (0.5, 0.3, 0.2)
_FPS, _FPS_P = (30.0, 15.0, 24.0, 1.0), (0.55, 0.25, 0.15, 0.05)
_CODECS, _CODEC_P = ("h264", "mpeg4", "msmpeg4v3", "wmv2"), (0.8, 0.1, 0.05, 0.05)
#: Embedding scale: per-clip scene, per-frame noise and the class signal added while an animal is in view.
SCENE_STD, FRAME_STD, SIGNAL = 0.5, 0.6, 0.35


@dataclass(frozen=True)
class RehearsalSpec:
    """What to generate: ``n`` clips, ``dim``-wide embeddings of at most ``frames`` frames, from ``seed``."""

    n: int
    dim: int = 1280
    frames: int = 45
    seed: int = 0
    videos_per_partition: int = 32
    backbones: tuple[str, ...] | None = None  # several backbones (the first is the main one); ``dim`` follows it

    def __post_init__(self) -> None:
        if self.backbones is not None:
            unknown = [b for b in self.backbones if b not in BACKBONES]
            if unknown or not self.backbones or len(set(self.backbones)) != len(self.backbones):
                raise ValueError(f"--backbones {','.join(self.backbones)}: give distinct registered backbones; "
                                 f"allowed: {', '.join(sorted(BACKBONES))}")
            object.__setattr__(self, "backbones", tuple(self.backbones))
            object.__setattr__(self, "dim", BACKBONES[self.backbones[0]].feature_dim)
        if self.n < 10:
            raise ValueError(f"--n must be at least 10 (5 folds need training clips), got {self.n}")
        if self.frames < 1:
            raise ValueError(f"--frames must be at least 1, got {self.frames}")
        if self.videos_per_partition < 1:
            raise ValueError(f"--videos-per-partition must be at least 1, got {self.videos_per_partition}")
        backbone_for_dim(self.dim)

    @property
    def backbone_names(self) -> list[str]:
        """Every backbone written, the main one first."""
        return list(self.backbones) if self.backbones else [backbone_for_dim(self.dim)]


def backbone_for_dim(dim: int) -> str:
    """The registered backbone whose feature size is ``dim`` (the default backbone first)."""
    for name in ("efficientnet_lite0", *sorted(BACKBONES)):
        if BACKBONES[name].feature_dim == dim:
            return name
    sizes = ", ".join(f"{s.feature_dim} ({s.name})" for s in BACKBONES.values())
    raise ValueError(f"--dim {dim}: no registered backbone has that feature size; allowed: {sizes}")


def rehearsal_config(out: Path, spec: RehearsalSpec) -> JobConfig:
    """The resolved config the artifacts match: run ``out`` (absolute), its label files, the sampling of T frames."""
    out = out.resolve()
    raw = {
        "run": {"name": out.name, "root": str(out.parent), "seed": spec.seed},
        "data": {"videos": str(out / "videos"), "labels": str(out / "train_labels.csv"),
                 "submission_format": str(out / "submission_format.csv"),
                 "test_labels": str(out / "test_labels.csv")},
        "catalog": {"videos_per_partition": spec.videos_per_partition, "partition_bytes": 0},  # parts of N clips
        # weights "random": the frames are made up, not the output of the published network, and the parts say so
        "embed": {"backbone": backbone_for_dim(spec.dim), "weights": "random", "sample_fps": SAMPLE_FPS,
                  "max_seconds": spec.frames / SAMPLE_FPS},
    }
    if spec.backbones:
        raw["embed"].update(backbone=spec.backbones[0], backbones=list(spec.backbones))
    return JobConfig.model_validate(raw)


# ---------------------------------------------------------------- the plan (client side, per-clip scalars)


def _filenames(n: int, seed: int) -> list[str]:
    """Distinct competition-like names (10 base-36 characters + .mp4): an affine bijection of the index."""
    space = 36**10
    a = int(space * 0.6180339887) | 1  # odd; made prime to 3 below, so coprime with 36: distinct names
    a += 2 if a % 3 == 0 else 0
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    names = []
    for i in range(n):
        x, chars = (a * (i + 1) + 7919 * seed) % space, []
        for _ in range(10):
            x, r = divmod(x, 36)
            chars.append(digits[r])
        names.append("".join(reversed(chars)) + ".mp4")
    return names


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """0/1 label matrix: one main class per clip by CLASS_SHARES, a second animal for a few animal clips."""
    share = np.array([CLASS_SHARES[c] for c in CLASS_NAMES], dtype=np.float64)
    labels = np.zeros((n, len(CLASS_NAMES)), dtype=np.float32)
    main = rng.choice(len(CLASS_NAMES), size=n, p=share / share.sum())
    labels[np.arange(n), main] = 1
    animal = share.copy()
    animal[_BLANK] = 0
    second = rng.choice(len(CLASS_NAMES), size=n, p=animal / animal.sum())
    extra = (main != _BLANK) & (rng.random(n) < SECOND_LABEL_SHARE)
    labels[np.flatnonzero(extra), second[extra]] = 1
    return labels


def _sizes(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """File sizes (~5 MB a clip, the competition's ~1 TB / 200k): larger with animals in view (more motion)."""
    animals = labels.sum(axis=1) - labels[:, _BLANK]
    return (rng.lognormal(np.log(4e6), 0.35, len(labels)) * (1 + 0.3 * animals)).astype(np.int64)


def plan_catalog(spec: RehearsalSpec, cfg: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The catalog (as ``build_catalog`` makes it) and each clip's kind (``ok``, ``error``, ``one_frame``)."""
    rng = np.random.default_rng([spec.seed, 1])
    labels = _labels(rng, spec.n)
    frame = pd.DataFrame(labels, columns=list(CLASS_NAMES))
    frame.insert(0, FILENAME, _filenames(spec.n, spec.seed))
    test = np.zeros(spec.n, dtype=bool)
    test[rng.choice(spec.n, size=int(round(spec.n * TEST_SHARE)), replace=False)] = True
    frame[SPLIT] = np.where(test, SPLIT_TEST, SPLIT_TRAIN)
    frame[SIZE_BYTES] = _sizes(rng, labels)
    frame = pd.concat([frame[~test].sort_values(FILENAME), frame[test].sort_values(FILENAME)], ignore_index=True)
    is_train = (frame[SPLIT] == SPLIT_TRAIN).to_numpy()
    frame[FOLD] = np.int32(-1)
    frame.loc[is_train, FOLD] = assign_folds(frame.loc[is_train, list(CLASS_NAMES)].to_numpy(),
                                             n_folds=cfg.catalog.n_folds, seed=cfg.run.seed)
    frame[VIDEO_ID] = frame[FILENAME]
    frame[PATH] = [f"{cfg.data.videos_root()}/{name}" for name in frame[FILENAME]]
    frame[PARTITION] = assign_partitions(frame[SIZE_BYTES].to_numpy(),
                                         videos_per_partition=cfg.catalog.videos_per_partition,
                                         partition_bytes=cfg.catalog.partition_bytes)
    truth = frame[list(CLASS_NAMES)].to_numpy(np.int8)  # test clips' labels too (test_labels.csv, the parts)
    frame.loc[~is_train, list(CLASS_NAMES)] = np.nan
    catalog = frame[[VIDEO_ID, FILENAME, PATH, SIZE_BYTES, SPLIT, FOLD, PARTITION, *CLASS_NAMES]]
    catalog = catalog.astype({FOLD: np.int32, **{c: np.float32 for c in CLASS_NAMES}})
    kinds = np.full(spec.n, "ok", dtype=object)
    picks = rng.permutation(spec.n)
    n_error = max(1, int(round(spec.n * ERROR_SHARE)))
    n_one = max(1, int(round(spec.n * ONE_FRAME_SHARE)))
    kinds[picks[:n_error]] = "error"
    kinds[picks[n_error : n_error + n_one]] = "one_frame"
    return catalog, pd.DataFrame({"labels": list(truth), "kind": kinds}, index=catalog[VIDEO_ID].to_numpy())


def _write_label_files(out: Path, catalog: pd.DataFrame, truth: pd.DataFrame) -> None:
    """train_labels.csv, submission_format.csv (0.5 everywhere, as the demo's) and test_labels.csv."""
    train = catalog[catalog[SPLIT] == SPLIT_TRAIN]
    test = catalog[catalog[SPLIT] == SPLIT_TEST][[FILENAME]]
    train[[FILENAME, *CLASS_NAMES]].astype({c: np.int8 for c in CLASS_NAMES}).to_csv(out / "train_labels.csv",
                                                                                      index=False)
    test.assign(**{c: 0.5 for c in CLASS_NAMES}).to_csv(out / "submission_format.csv", index=False)
    labels = np.stack(truth.loc[test[FILENAME], "labels"].to_numpy()) if len(test) else []
    pd.concat([test.reset_index(drop=True), pd.DataFrame(labels, columns=list(CLASS_NAMES))], axis=1).to_csv(
        out / "test_labels.csv", index=False)


# ---------------------------------------------------------------- one partition (a Dask task)


def _class_directions(seed: int, dim: int) -> np.ndarray:
    """One fixed unit-variance direction per class (the same in every task)."""
    return np.random.default_rng([seed, 2]).standard_normal((len(CLASS_NAMES), dim)).astype(np.float32)


def _clip_facts(rng: np.random.Generator, labels: np.ndarray, kind: str, size: int, frames: int,
                max_seconds: float) -> dict[str, Any]:
    """Container facts and the number of sampled frames of one clip."""
    width, height = _RESOLUTIONS[rng.choice(len(_RESOLUTIONS), p=_RESOLUTION_P)]
    fps = float(_FPS[rng.choice(len(_FPS), p=_FPS_P)])
    duration = 15.0 if rng.random() >= SHORT_SHARE else float(rng.uniform(1.0, 15.0))
    decoded = max(1, int(round(fps * duration)))
    if kind == "one_frame":
        decoded, duration = 1, 1.0 / fps
    codec = str(_CODECS[rng.choice(len(_CODECS), p=_CODEC_P)])
    sampled = max(1, int(np.floor(min(duration, max_seconds) * SAMPLE_FPS + 1e-9)))
    return {"codec": codec, "width": width, "height": height, "fps": fps, "duration_s": duration,
            "declared_frames": -1 if codec == "wmv2" else decoded, "decoded_frames": decoded,
            "bit_rate": size * 8.0 / duration, "has_audio": bool(rng.random() < 0.05),
            N_FRAMES: int(min(frames, sampled, decoded))}


def _pixels(rng: np.random.Generator, labels: np.ndarray, n_frames: int) -> dict[str, float]:
    """Brightness and saturation (night clips dark and grey), motion growing with the animals in view."""
    night = rng.random() < NIGHT_SHARE
    level = 0.008 + sum(0.01 + 0.002 * k for k in np.flatnonzero(labels) if k != _BLANK)
    diffs = np.abs(rng.normal(level, level / 2, max(n_frames - 1, 0)))
    stats = {"brightness_mean": rng.normal(0.22 if night else 0.45, 0.05),
             "saturation_mean": abs(rng.normal(0.02 if night else 0.25, 0.03))}
    if len(diffs):
        stats.update(motion_mean=diffs.mean(), motion_max=diffs.max(), motion_p50=np.percentile(diffs, 50),
                     motion_p90=np.percentile(diffs, 90), motion_frac=(diffs > 0.02).mean())
    return {k: float(stats.get(k, np.nan)) for k in PIXEL_COLUMNS}


#: When an animal is in view in a clip: (class, first frame, frames, signal strength).
Window = tuple[int, int, int, float]


def _embedding(rng: np.random.Generator, labels: np.ndarray, n_frames: int, directions: np.ndarray,
               windows: list[Window] | None = None) -> tuple[np.ndarray, list[Window]]:
    """``n_frames x D`` float16: scene + frame noise + each animal's direction while it is in view, and the
    windows the animals were in view (drawn here unless given: another backbone sees the same animals)."""
    dim = directions.shape[1]
    x = rng.standard_normal((n_frames, dim), dtype=np.float32) * np.float32(FRAME_STD)
    x += rng.standard_normal(dim, dtype=np.float32) * np.float32(SCENE_STD)
    if windows is None:
        windows = []
        for k in np.flatnonzero(labels):
            if k == _BLANK:
                continue
            length = int(rng.integers(max(1, n_frames // 3), n_frames + 1))
            start = int(rng.integers(0, n_frames - length + 1))
            windows.append((int(k), start, length, SIGNAL * rng.uniform(0.6, 1.4)))
    for k, start, length, strength in windows:
        x[start : start + length] += directions[k] * np.float32(strength)
    return x.astype(np.float16).reshape(-1), windows


def _row(rng: np.random.Generator, clip: pd.Series, labels: np.ndarray, kind: str, frames: int,
         max_seconds: float, directions: np.ndarray) -> tuple[dict[str, Any], list[Window]]:
    if kind == "error":
        row: dict[str, Any] = {name: None for name in EMBED_SCHEMA.names}
        row.update({VIDEO_ID: clip[VIDEO_ID], N_FRAMES: 0, EMBEDDING: np.zeros(0, np.float16),
                    SIZE_BYTES: int(clip[SIZE_BYTES]), STATUS: STATUS_ERROR,
                    ERROR: f"{clip[PATH]}: Invalid data found when processing input (rehearsal error row)"})
        return row, []
    facts = _clip_facts(rng, labels, kind, int(clip[SIZE_BYTES]), frames, max_seconds)
    embedding, windows = _embedding(rng, labels, facts[N_FRAMES], directions)
    return {VIDEO_ID: clip[VIDEO_ID], **facts, SIZE_BYTES: int(clip[SIZE_BYTES]), EMBEDDING: embedding,
            **_pixels(rng, labels, facts[N_FRAMES]), STATUS: STATUS_OK, ERROR: None}, windows


def _write_part(records: list[dict[str, Any]], rows: pd.DataFrame, settings: EmbedSettings, out_path: Path) -> None:
    frame = pd.DataFrame.from_records(records, columns=EMBED_SCHEMA.names)
    table = pa.Table.from_pandas(frame, schema=EMBED_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(_file_metadata(settings, _rows_hash(rows), len(frame), _clips(rows)))
    write_parquet_atomic(table, out_path)


def _other_records(records: list[dict[str, Any]], windows: list[list[Window]], seed: int, partition: int,
                   index: int, dim: int) -> list[dict[str, Any]]:
    """The ``index``-th other backbone's rows: the main rows with embeddings of its own directions and noise."""
    rng = np.random.default_rng([seed, 3, partition, index])
    directions = np.random.default_rng([seed, 2, index]).standard_normal((len(CLASS_NAMES), dim)).astype(np.float32)
    return [row if row[STATUS] == STATUS_ERROR else
            {**row, EMBEDDING: _embedding(rng, np.zeros(0), row[N_FRAMES], directions, seen)[0]}
            for row, seen in zip(records, windows, strict=True)]


def generate_part(catalog_path: Path, partition: int, out_path: Path, settings: EmbedSettings,
                  plan: Mapping[str, tuple[list[float], str]], seed: int, frames: int, dim: int,
                  others: list[tuple[Path, EmbedSettings]] | None = None) -> dict[str, int]:
    """Dask task: one partition's rows as the embed stage writes them (same schema, metadata and name), for the
    main backbone (``out_path``, ``settings``) and each other one (``others``: its part path and settings)."""
    rows = read_parquet(catalog_path, filters=[(PARTITION, "==", partition)])
    rng = np.random.default_rng([seed, 3, partition])
    directions = _class_directions(seed, dim)
    made = [_row(rng, clip, np.asarray(plan[clip[VIDEO_ID]][0]), plan[clip[VIDEO_ID]][1], frames,
                 settings.max_seconds, directions) for _, clip in rows.iterrows()]
    records = [row for row, _ in made]
    _write_part(records, rows, settings, out_path)
    for index, (path, other) in enumerate(others or [], start=1):
        other_dim = BACKBONES[other.backbone].feature_dim
        _write_part(_other_records(records, [w for _, w in made], seed, partition, index, other_dim), rows, other,
                    path)
    return {"videos": len(records), "failed": sum(r[STATUS] == STATUS_ERROR for r in records)}


# ---------------------------------------------------------------- the whole run directory


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: choose a new run directory")


def write_rehearsal(client: Client, out: Path, spec: RehearsalSpec) -> dict[str, Any]:
    """Write the label files, catalog, embedding parts, manifest and config.yaml of a finished embed stage."""
    from jungletrap.lineage import stage_lineage
    from jungletrap.pipeline import stage_hashes  # the pipeline imports every stage: only when writing

    out = Path(out).resolve()
    _check_empty(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(rehearsal_config(out, spec), out / "config.yaml")
    cfg = load_config(out / "config.yaml")  # hashes from the file a later run loads, not from memory
    manifest = Manifest(out)
    catalog, plan = plan_catalog(spec, cfg)
    _write_label_files(out, catalog, plan)
    write_catalog(catalog, out / CATALOG_NAME)
    hashes = stage_hashes(cfg)  # after the label files exist: their stamps are part of the catalog hash
    manifest.start("catalog", hashes["catalog"])
    manifest.finish("catalog", status="done", outputs=[CATALOG_NAME], counts={
        **catalog[SPLIT].value_counts().to_dict(), "missing_files": 0, "partitions": int(catalog[PARTITION].nunique())})
    manifest.start("embed", hashes["embed"])
    targets = {b: (out / "embeddings" / b, _settings(cfg, b)) for b in cfg.embed.backbone_names}
    counts = _generate_parts(client, out / CATALOG_NAME, targets, catalog, plan, spec)
    outputs = [str(d.relative_to(out)) for d, _ in targets.values()]  # the main backbone's first
    manifest.finish("embed", status="done", counts={**counts, "warnings": 0}, outputs=outputs,
                    lineage=stage_lineage("embed", out, manifest, outputs))
    several = f", backbones={','.join(spec.backbones)}" if spec.backbones else ""
    manifest.record_event(f"catalog and embed written by demo-embeddings (rehearsal data, no video decoded; "
                          f"n={spec.n}, dim={spec.dim}, frames={spec.frames}, seed={spec.seed}{several}, "
                          f"generator {GENERATOR_VERSION})")
    return {**counts, "run_dir": str(out), "backbone": cfg.embed.backbone, "backbones": cfg.embed.backbone_names}


def _settings(cfg: JobConfig, backbone: str) -> EmbedSettings:
    """The embed settings of one backbone of the run, pinned to its seeded random weights."""
    settings = embed_settings(cfg.embed)
    if backbone != settings.backbone:
        settings = replace(settings, backbone=backbone, weights=cfg.embed.weights_for(backbone))
    return replace(settings, pinned_weights=resolve_weights(backbone, "random"))


def _generate_parts(client: Client, catalog_path: Path, targets: Mapping[str, tuple[Path, EmbedSettings]],
                    catalog: pd.DataFrame, plan: pd.DataFrame, spec: RehearsalSpec) -> dict[str, int]:
    """One task per partition (writing its part of every backbone), each given only its clips' labels and kinds;
    futures released as they finish. ``targets``: backbone → (embedding directory, settings), the main first."""
    for embed_dir, _ in targets.values():
        embed_dir.mkdir(parents=True, exist_ok=True)
    (embed_dir, settings), *others = targets.values()
    token = path_token(embed_dir)
    futures = []
    for p, rows in catalog.groupby(PARTITION, sort=True):
        part_plan = {v: (plan.at[v, "labels"].tolist(), str(plan.at[v, "kind"])) for v in rows[VIDEO_ID]}
        other_parts = [(part_path(d, int(p)), s) for d, s in others] or None
        futures.append(client.submit(generate_part, catalog_path, int(p), part_path(embed_dir, int(p)), settings,
                                     part_plan, spec.seed, spec.frames, spec.dim, other_parts,
                                     key=f"demo-embeddings-{int(p):05d}-{token}", pure=False))
    counts = {"partitions": len(futures), "videos": 0, "embedded": 0, "skipped": 0, "failed": 0}
    for fut in as_completed(futures):
        part = fut.result()
        fut.release()
        counts["videos"] += part["videos"]
        counts["embedded"] += part["videos"] - part["failed"]
        counts["failed"] += part["failed"]
    return counts
