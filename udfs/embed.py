"""Embedding UDF: a catalog partition in, one row per video out (embeddings or an error), always.

Stateful GPU/CPU work follows the callable-class UDF pattern: the backbone is built once per worker process
(cached by backbone name and device) and reused for every partition that worker runs. Decoding runs ahead of
inference in a small thread pool, and frames of several videos are batched together up to ``batch_size``.
A broken video never raises out of the partition: it becomes a row with ``status="error"`` and the reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from jungletrap.backbones import BackboneSpec, build_backbone, get_spec, preprocess
from jungletrap.cluster import relax_malloc_trim, worker_nthreads
from jungletrap.schema import (
    CONTAINER_COLUMNS,
    EMBEDDING,
    ERROR,
    N_FRAMES,
    PATH,
    PIXEL_COLUMNS,
    SIZE_BYTES,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    VIDEO_ID,
)
from jungletrap.storage import open_clip
from jungletrap.video import ClipInfo, VideoDecodeError, letterbox_box, read_clip

__all__ = [
    "EMBED_SCHEMA",
    "EMBED_SCHEMA_VERSION",
    "EmbedSettings",
    "embed_partition",
    "pixel_stats",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: Bumped whenever EMBED_SCHEMA changes: parts written under another version are recomputed.
EMBED_SCHEMA_VERSION = "2"

#: Output schema of :func:`embed_partition` (and of every ``embeddings/<backbone>/part-*.parquet``).
EMBED_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string()),
        pa.field(N_FRAMES, pa.int32()),
        pa.field(EMBEDDING, pa.list_(pa.float16())),  # n_frames x D, row-major; D in the file metadata
        pa.field("codec", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("fps", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("declared_frames", pa.int64()),
        pa.field("decoded_frames", pa.int64()),
        pa.field("bit_rate", pa.float64()),
        pa.field("has_audio", pa.bool_()),
        pa.field(SIZE_BYTES, pa.int64()),
        *[pa.field(name, pa.float32()) for name in PIXEL_COLUMNS],
        pa.field(STATUS, pa.string()),
        pa.field(ERROR, pa.string()),
    ]
)
assert all(name in EMBED_SCHEMA.names for name in CONTAINER_COLUMNS)

_MOTION_THRESHOLD = 0.02  # mean |difference| of grey levels (0..1) above which a frame pair "moves"


@dataclass(frozen=True)
class EmbedSettings:
    """Everything the UDF needs, picklable and hashable (the model cache key uses backbone and device)."""

    backbone: str
    sample_fps: float
    max_seconds: float
    n_frames: int | None
    batch_size: int | None  # None: batch_size_for() picks by device
    dtype: str
    device: str
    decode_timeout_s: float
    prefetch_videos: int
    decode_threads: int = 2
    codec_threads: int = 0  # FFmpeg threads per clip, 0 = FFmpeg's choice
    input_size: int | None = None  # None: the backbone's own input size


_MODEL_CACHE: dict[tuple[str, str], torch.nn.Module] = {}
_MODEL_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    """``auto`` means the worker's GPU when torch sees one (dask-cuda pins one GPU per worker), else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _model(spec: BackboneSpec, device: str) -> torch.nn.Module:
    key = (spec.name, device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            if device == "cpu":
                torch.set_num_threads(worker_nthreads(default=torch.get_num_threads()))
                relax_malloc_trim()
            _MODEL_CACHE[key] = build_backbone(spec, device)
        return _MODEL_CACHE[key]


def pixel_stats(frames: np.ndarray, info: ClipInfo, size: int) -> dict[str, float]:
    """Brightness, colour saturation and frame-to-frame motion of the sampled frames (letterbox excluded).

    Channels are taken as three planes: numpy reductions over a length-3 last axis ran ~20x slower, and at
    ~0.2 s a clip they were the embed stage's bottleneck on a GPU worker (bench/gpu.py).
    """
    box = _content(frames, info, size)
    r, g, b = box[..., 0], box[..., 1], box[..., 2]
    grey = (r.astype(np.float32) + g + b) * np.float32(1 / (3 * 255))
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    saturation = (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)  # 0 on black pixels
    stats = {
        "brightness_mean": float(grey.mean()),
        "saturation_mean": float(saturation.mean()),
        "motion_mean": float("nan"),
        "motion_max": float("nan"),
        "motion_p50": float("nan"),
        "motion_p90": float("nan"),
        "motion_frac": float("nan"),
    }
    if len(grey) > 1:  # one frame has no motion to measure: NaN, not zero
        diff = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))
        stats.update(
            motion_mean=float(diff.mean()),
            motion_max=float(diff.max()),
            motion_p50=float(np.percentile(diff, 50)),
            motion_p90=float(np.percentile(diff, 90)),
            motion_frac=float((diff > _MOTION_THRESHOLD).mean()),
        )
    return stats


def _content(frames: np.ndarray, info: ClipInfo, size: int) -> np.ndarray:
    """The frames without the letterbox bands (one pixel of margin against rounding)."""
    if info.width <= 0 or info.height <= 0:
        return frames
    top, left, h, w = letterbox_box(info.width, info.height, size)
    box = frames[:, top + 1 : top + h - 1, left + 1 : left + w - 1]
    return box if box.size else frames


def _decode(row: pd.Series, settings: EmbedSettings, size: int,
            storage_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, ClipInfo]:
    with open_clip(row[PATH], storage_options) as source:  # a remote clip is read as a file object
        return read_clip(
            source,
            sample_fps=settings.sample_fps,
            max_seconds=settings.max_seconds,
            n_frames=settings.n_frames,
            size=size,
            timeout_s=settings.decode_timeout_s,
            threads=settings.codec_threads,
        )


def _decoded_clips(
    rows: pd.DataFrame, settings: EmbedSettings, size: int, storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, np.ndarray | None, ClipInfo | None, str | None]]:
    """Yield (position, frames, info, error) in order while a thread pool decodes the next clips."""
    with ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode") as pool:
        pending: list[tuple[int, Future[tuple[np.ndarray, ClipInfo]]]] = []
        positions = iter(range(len(rows)))
        for pos in positions:
            pending.append((pos, pool.submit(_decode, rows.iloc[pos], settings, size, storage_options)))
            if len(pending) >= settings.prefetch_videos:
                break
        while pending:
            pos, fut = pending.pop(0)
            nxt = next(positions, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, rows.iloc[nxt], settings, size, storage_options)))
            try:
                frames, info = fut.result()
                yield pos, frames, info, None
            except VideoDecodeError as err:
                yield pos, None, None, str(err)
            except Exception as err:  # a decoder bug must still cost one row, not the partition
                yield pos, None, None, f"{rows.iloc[pos][PATH]}: unexpected {type(err).__name__}: {err}"


#: Frames per forward pass when ``embed.batch_size`` is null. On a GPU large batches fill the device. On a CPU
#: small ones win: a batch's activations stay in cache (EfficientNet-Lite0, 1 thread: 4 frames 41 frames/s,
#: 64 frames 21 frames/s), and the worker's peak memory shrinks with them.
GPU_BATCH, CPU_BATCH_PER_THREAD = 64, 4


def batch_size_for(settings: EmbedSettings, device: str) -> int:
    """The configured batch size, or the device's default."""
    if settings.batch_size:
        return settings.batch_size
    return GPU_BATCH if device.startswith("cuda") else CPU_BATCH_PER_THREAD * torch.get_num_threads()


def _run_model(model: torch.nn.Module, spec: BackboneSpec, frames: np.ndarray, settings: EmbedSettings,
               device: str) -> np.ndarray:
    out = []
    step = batch_size_for(settings, device)
    with torch.inference_mode():
        for start in range(0, len(frames), step):
            batch = torch.from_numpy(frames[start : start + step])
            if device.startswith("cuda"):
                batch = batch.pin_memory().to(device, non_blocking=True)
            x = preprocess(batch, spec)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                feats = model(x)
            out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, spec.feature_dim), np.float32)


def embed_partition(rows: pd.DataFrame, *, settings: EmbedSettings,
                    storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Embed every clip of a catalog partition; the result follows :data:`EMBED_SCHEMA`, one row per input.

    ``storage_options`` (fsspec) open remote clips (``s3://...``) as file objects; local paths need none.
    """
    spec = get_spec(settings.backbone)
    device = resolve_device(settings.device)
    model = _model(spec, device)
    size = settings.input_size or spec.input_size
    np_dtype = np.float16 if settings.dtype == "float16" else np.float32
    records: list[dict[str, Any]] = [_error_record(r, "not processed") for _, r in rows.iterrows()]
    buffer: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not buffer:
            return
        feats = _run_model(model, spec, np.concatenate([f for _, f in buffer]), settings, device)
        offset = 0
        for pos, frames in buffer:
            n = len(frames)
            records[pos][EMBEDDING] = feats[offset : offset + n].astype(np_dtype).reshape(-1)
            offset += n
        buffer.clear()

    for pos, frames, info, error in _decoded_clips(rows, settings, size, storage_options):
        row = rows.iloc[pos]
        if error is not None or frames is None or info is None or len(frames) == 0:
            records[pos] = _error_record(row, error or f"{row[PATH]}: no frame could be decoded")
            continue
        records[pos] = _ok_record(row, frames, info, size)
        buffer.append((pos, frames))
        if sum(len(f) for _, f in buffer) >= batch_size_for(settings, device):
            flush()
    flush()
    return pd.DataFrame.from_records(records, columns=EMBED_SCHEMA.names)


def _ok_record(row: pd.Series, frames: np.ndarray, info: ClipInfo, size: int) -> dict[str, Any]:
    rec: dict[str, Any] = {VIDEO_ID: row[VIDEO_ID], N_FRAMES: len(frames), EMBEDDING: None}
    rec.update({k: v for k, v in info.as_dict().items() if k in EMBED_SCHEMA.names})
    rec.update(pixel_stats(frames, info, size))
    rec.update({STATUS: STATUS_OK, ERROR: None})
    return rec


def _error_record(row: pd.Series, error: str) -> dict[str, Any]:
    rec: dict[str, Any] = {name: None for name in EMBED_SCHEMA.names}
    rec.update({VIDEO_ID: row[VIDEO_ID], N_FRAMES: 0, EMBEDDING: np.zeros(0, np.float16)})
    rec.update({SIZE_BYTES: int(row.get(SIZE_BYTES, -1)), STATUS: STATUS_ERROR, ERROR: error})
    return rec
