"""Synthetic camera-trap demo data in the Pri-matrix layout: clips, label CSVs and a manifest.

Why: the pipeline needs a small, realistic and *learnable* dataset that anyone can build offline. Each of the 24
classes has a fixed drawn design (shape, size, colour, texture, gait, speed) moving over a textured forest scene
with wind and lighting changes, so pooled CNN features can separate the common classes. Priors are imbalanced like
a real camera-trap set, ~30% of clips are infrared night clips, and clips mix resolutions, frame rates (1 fps
included) and containers (MP4/MKV H.264, AVI MPEG-4, ASF MS-MPEG4v3, WMV WMV2). Frames are drawn by
:mod:`jungletrap.synthetic_scene` (the class designs, scene and animals) and encoded here with PyAV's bundled FFmpeg
using deterministic settings (one encoder thread, bit-exact muxing). This module owns the dataset plan (every random
choice, made up front), the encoding, the CSVs and the manifest.

Completeness: each clip and CSV is written under a temporary name and renamed, and ``MANIFEST.json`` is written
last, so :func:`demo_dataset_complete` is the one check a caller needs before skipping generation.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd

from jungletrap.schema import CLASS_NAMES, FILENAME, SPLIT_TEST, SPLIT_TRAIN
from jungletrap.synthetic_scene import _DESIGNS, BLANK, _render

__all__ = [
    "CLASS_PRIORS",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "DemoDataset",
    "demo_dataset_complete",
    "generate_demo_dataset",
    "write_clip",
    "write_static_clip",
]

GENERATOR_VERSION = "1"
MANIFEST_NAME = "MANIFEST.json"
BLANK_SHARE = 0.35  # share of blank clips; the others draw a primary class from CLASS_PRIORS
MULTI_LABEL_SHARE = 0.15  # of non-blank clips get a second class, i.e. ~10% of all clips
#: Relative weights of the primary class of a non-blank clip (camera-trap-like imbalance).
CLASS_PRIORS: dict[str, float] = {
    "chimpanzee": 0.14, "duiker": 0.14, "small antelope": 0.08, "human": 0.08, "other (primate)": 0.08,
    "elephant": 0.07, "bird": 0.06, "rodent": 0.05, "hog": 0.05, "other (non-primate)": 0.05,
    "porcupine": 0.03, "forest buffalo": 0.03, "gorilla": 0.03, "leopard": 0.02, "large ungulate": 0.02,
    "cattle": 0.015, "small cat": 0.01, "reptile": 0.01, "pangolin": 0.008, "hyena": 0.006,
    "wild dog": 0.005, "hippopotamus": 0.005, "lion": 0.004,
}  # fmt: skip
_RESOLUTIONS, _RESOLUTION_P = ((320, 180), (480, 270), (640, 360), (320, 240), (480, 360)), (.35, .3, .15, .12, .08)
_FPS, _FPS_P = (1.0, 8.0, 12.0, 15.0, 24.0), (0.1, 0.15, 0.25, 0.3, 0.2)
_EXTS, _EXT_P = (".mp4", ".mkv", ".avi", ".asf", ".wmv"), (0.62, 0.1, 0.14, 0.07, 0.07)
_CODEC_BY_EXT = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4", ".asf": "msmpeg4",
                 ".wmv": "wmv2"}  # fmt: skip
_BLANK_NIGHT = 0.3  # night probability of a blank clip


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a demo dataset in the competition layout under ``root``."""

    root: Path
    videos_dir: Path
    train_labels: Path
    submission_format: Path
    test_labels: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> DemoDataset:
        """The paths a dataset under ``root`` has, whether or not it is complete."""
        root = Path(root)
        return cls(root, root / "videos", root / "train_labels.csv", root / "submission_format.csv",
                   root / "test_labels.csv", root / MANIFEST_NAME)  # fmt: skip


@dataclass(frozen=True)
class _ClipPlan:
    filename: str
    split: str
    classes: tuple[str, ...]
    seed: int
    width: int
    height: int
    fps: float
    seconds: float
    night: bool


# ---------------------------------------------------------------- encoding


def _encode(path: Path, frames: Iterator[np.ndarray], *, width: int, height: int, fps: float,
            codec: str | None) -> None:  # fmt: skip
    """Encode to a temporary sibling and rename, so a clip file is either whole or absent."""
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    codec = codec or _CODEC_BY_EXT.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"no default codec for extension {path.suffix!r}; pass codec=")
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), "w", options={"fflags": "+bitexact"}) as container:  # bitexact: no random MKV UIDs
            stream = container.add_stream(codec, rate=rate)
            assert isinstance(stream, av.VideoStream)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1  # libx264 output is reproducible only single-threaded
            if codec == "libx264":
                stream.options = {"preset": "superfast", "crf": "26"}
            else:
                stream.codec_context.bit_rate = int(max(2e5, 0.12 * width * height * fps))
            for i, arr in enumerate(frames):
                rgb = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB) if arr.ndim == 2 else arr
                # OpenCV's I420 uses the same BT.601 limited range as swscale's default and is ~10x faster.
                yuv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), np.uint8)
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts, frame.time_base = i, 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_clip(path: Path, *, classes: Sequence[str], seed: int, width: int, height: int, fps: float,
               seconds: float, night: bool = False, codec: str | None = None) -> None:  # fmt: skip
    """Write one synthetic camera-trap clip of ``round(fps * seconds)`` frames.

    ``classes`` are CLASS_NAMES entries (``[]`` or ``["blank"]`` for an empty scene). The codec follows the
    extension unless given (.mp4/.mkv/.mov H.264, .avi MPEG-4, .asf MS-MPEG4v3, .wmv WMV2).
    """
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; allowed: {list(CLASS_NAMES)}")
    n = max(1, round(fps * seconds))
    frames = _render(classes, seed=seed, width=width, height=height, fps=fps, n_frames=n, night=night)
    _encode(Path(path), frames, width=width, height=height, fps=fps, codec=codec)


def write_static_clip(path: Path, *, width: int, height: int, fps: float, seconds: float,
                      color: tuple[int, int, int] = (90, 120, 60)) -> None:  # fmt: skip
    """Write a clip whose frames are all one flat RGB colour: zero motion, for motion-feature tests."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = color
    n = max(1, round(fps * seconds))
    _encode(Path(path), (frame for _ in range(n)), width=width, height=height, fps=fps, codec=None)


# ---------------------------------------------------------------- dataset


def _sample_labels(rng: np.random.Generator) -> set[str]:
    if rng.random() < BLANK_SHARE:
        return {BLANK}
    names, weights = list(CLASS_PRIORS), np.array(list(CLASS_PRIORS.values()))
    first = names[rng.choice(len(names), p=weights / weights.sum())]
    if rng.random() >= MULTI_LABEL_SHARE:
        return {first}
    weights[names.index(first)] = 0
    return {first, names[rng.choice(len(names), p=weights / weights.sum())]}


def _cover(labels: list[set[str]], idx: list[int], need: int, classes: Sequence[str],
           rng: np.random.Generator) -> None:  # fmt: skip
    """Relabel clips among ``idx`` until each class occurs ``need`` times there, taking only donor clips whose
    classes stay at or above ``need`` (best effort when there are too few clips)."""
    counts = Counter(c for i in idx for c in labels[i])
    for cls in sorted(classes, key=lambda c: counts[c]):
        while counts[cls] < need:
            donors = [i for i in idx if cls not in labels[i] and all(counts[c] > need for c in labels[i])]
            if not donors:
                break
            i = donors[int(rng.integers(len(donors)))]
            counts.subtract(labels[i])
            labels[i] = {cls}
            counts[cls] += 1


def _plan(n_videos: int, test_fraction: float, seed: int) -> list[_ClipPlan]:
    """Every random choice of the dataset, made up front in one process so that n_jobs changes nothing."""
    rng = np.random.default_rng(seed)
    n_train = n_videos - round(n_videos * test_fraction)
    labels = [_sample_labels(rng) for _ in range(n_videos)]
    _cover(labels, list(range(n_train)), 2 if n_videos >= 200 else 1, CLASS_NAMES, rng)
    missing = [c for c in CLASS_NAMES if not any(c in s for s in labels)]
    _cover(labels, list(range(n_train, n_videos)), 1, missing, rng)
    alphabet, stems = np.array(list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")), set()
    plans = []
    for i, classes in enumerate(labels):
        while (stem := "".join(rng.choice(alphabet, 10))) in stems:
            pass
        stems.add(stem)
        width, height = _RESOLUTIONS[rng.choice(len(_RESOLUTIONS), p=_RESOLUTION_P)]
        fps = float(rng.choice(_FPS, p=_FPS_P))
        n_frames = max(1, round(fps * rng.uniform(2, 12)))
        p_night = np.mean([_BLANK_NIGHT if c == BLANK else _DESIGNS[c].night for c in classes])
        ext = _EXTS[rng.choice(len(_EXTS), p=_EXT_P)]
        plans.append(_ClipPlan(stem + ext, SPLIT_TRAIN if i < n_train else SPLIT_TEST,
                               tuple(c for c in CLASS_NAMES if c in classes), int(rng.integers(2**31)), width,
                               height, fps, n_frames / fps, bool(rng.random() < p_night)))  # fmt: skip
    return plans


def _write_plan(plan: _ClipPlan, videos_dir: Path) -> None:
    write_clip(videos_dir / plan.filename, classes=plan.classes, seed=plan.seed, width=plan.width,
               height=plan.height, fps=plan.fps, seconds=plan.seconds, night=plan.night)  # fmt: skip


def _write_all(plans: Sequence[_ClipPlan], videos_dir: Path, n_jobs: int) -> None:
    order = sorted(plans, key=lambda p: -p.width * p.height * p.fps * p.seconds)  # longest first balances the pool
    if n_jobs <= 1:
        for p in order:
            _write_plan(p, videos_dir)
        return
    # spawn, not fork: callers may hold threads (Dask clients); cv2 threads off in workers to avoid oversubscription
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        futures = [pool.submit(_write_plan, p, videos_dir) for p in order]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _labels_csv(plans: Sequence[_ClipPlan], value: float | None = None) -> str:
    rows = [[p.filename, *[int(c in p.classes) if value is None else value for c in CLASS_NAMES]]
            for p in sorted(plans, key=lambda p: p.filename)]  # fmt: skip
    return pd.DataFrame(rows, columns=[FILENAME, *CLASS_NAMES]).to_csv(index=False)


def generate_demo_dataset(out_dir: Path, *, n_videos: int = 400, test_fraction: float = 0.25, seed: int = 0,
                          n_jobs: int = 1) -> DemoDataset:  # fmt: skip
    """Write a synthetic dataset in the Pri-matrix layout under ``out_dir`` and return its paths.

    Deterministic in ``seed`` (labels, file names and, with these encoder settings, file bytes) whatever
    ``n_jobs``. An existing MANIFEST.json is removed first and rewritten last; other files are overwritten, never
    deleted. Every class occurs at least twice among train clips when ``n_videos >= 200``, else at least once
    overall when there are enough clips. ``n_jobs > 1`` encodes in a spawned process pool.
    """
    if n_videos < 1 or not 0 <= test_fraction < 1:
        raise ValueError(f"need n_videos >= 1 and 0 <= test_fraction < 1, got {n_videos}, {test_fraction}")
    ds = DemoDataset.at(Path(out_dir))
    ds.manifest.unlink(missing_ok=True)
    ds.videos_dir.mkdir(parents=True, exist_ok=True)
    plans = _plan(n_videos, test_fraction, seed)
    _write_all(plans, ds.videos_dir, n_jobs)
    train, test = [p for p in plans if p.split == SPLIT_TRAIN], [p for p in plans if p.split == SPLIT_TEST]
    _write_text(ds.train_labels, _labels_csv(train))
    _write_text(ds.submission_format, _labels_csv(test, 0.5))
    _write_text(ds.test_labels, _labels_csv(test))
    manifest = {
        "generator": __name__, "generator_version": GENERATOR_VERSION, "seed": seed, "n_videos": n_videos,
        "test_fraction": test_fraction,
        "counts": {SPLIT_TRAIN: len(train), SPLIT_TEST: len(test), "night": sum(p.night for p in plans),
                   "multi_label": sum(len(p.classes) > 1 for p in plans),
                   "containers": dict(Counter(Path(p.filename).suffix for p in plans))},
        "class_counts": {s: {c: sum(c in p.classes for p in ps) for c in CLASS_NAMES}
                         for s, ps in ((SPLIT_TRAIN, train), (SPLIT_TEST, test))},
        "clips": [asdict(p) | {FILENAME: p.filename, "n_frames": round(p.fps * p.seconds)} for p in plans],
    }  # fmt: skip
    _write_text(ds.manifest, json.dumps(manifest, indent=1))
    return ds


def demo_dataset_complete(out_dir: Path, *, seed: int | None = None, n_videos: int | None = None) -> bool:
    """True when ``out_dir`` holds a finished dataset of this generator version (and the given seed and size).

    Checks the manifest (written last), the three CSVs, and that every clip it lists exists.
    """
    ds = DemoDataset.at(Path(out_dir))
    try:
        manifest = json.loads(ds.manifest.read_text())
        clips = [ds.videos_dir / c[FILENAME] for c in manifest["clips"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_videos": n_videos}
    if any(v is not None and manifest.get(k) != v for k, v in wanted.items()):
        return False
    return all(p.is_file() for p in [ds.train_labels, ds.submission_format, ds.test_labels, *clips])
