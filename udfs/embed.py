"""Embedding UDF: a catalog partition in, one row per video out (embeddings or an error), always.

Stateful GPU/CPU work follows the callable-class UDF pattern: the backbone is built (and, for OpenVINO,
converted and compiled: :mod:`jungletrap.runtimes`) once per worker process, cached by backbone, weights, device,
runtime and input size, and reused for every partition that worker runs. Clips decode ahead of
inference in the worker's decoder processes (:mod:`jungletrap.decoding`), so the model thread runs nothing but
the model; frames of several videos are batched together up to ``batch_size``.
A broken video never raises out of the partition: it becomes a row with ``status="error"`` and the reason.

Several backbones (``embed.backbones``): :func:`embed_partition_backbones` decodes each clip once, letterboxed at
every backbone's input size in the same pass (:func:`jungletrap.video.read_clip_sizes`), and runs each backbone
on its own frames; each backbone's rows are exactly what :func:`embed_partition` gives for it alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from jungletrap.backbones import BackboneSpec, build_backbone, get_spec, preprocess
from jungletrap.cluster import relax_malloc_trim, worker_nthreads
from jungletrap.decoding import DecodedClip, DecodeJob, decode_in_order, decoder_processes_for
from jungletrap.pixels import pixel_stats
from jungletrap.runtimes import FeatureModel, compile_backbone, resolve_runtime
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
    WARNING,
)
from jungletrap.weights import ResolvedWeights, WeightsError, resolve_weights

__all__ = [
    "EMBED_SCHEMA",
    "EMBED_SCHEMA_VERSION",
    "EmbedSettings",
    "LoadedModel",
    "embed_partition",
    "embed_partition_backbones",
    "model_builds",
    "pixel_stats",
    "resolve_device",
    "runtime_for",
]

log = logging.getLogger(__name__)

#: Bumped whenever EMBED_SCHEMA changes: parts written under another version are recomputed.
EMBED_SCHEMA_VERSION = "3"  # 3: the ``warning`` column

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
        pa.field(WARNING, pa.string()),  # ok rows that lost real frames: why (see video.read_clip)
    ]
)
assert all(name in EMBED_SCHEMA.names for name in CONTAINER_COLUMNS)

@dataclass(frozen=True)
class EmbedSettings:
    """Everything the UDF needs, picklable and hashable.

    ``weights`` is ``embed.weights`` as configured; ``pinned_weights`` is what the embed stage resolved it to on
    a worker before any task ran (None: not pinned, e.g. a direct call): every worker must load the same bytes.
    """

    backbone: str
    sample_fps: float
    max_seconds: float
    n_frames: int | None
    batch_size: int | None  # None: batch_size_for() picks by device
    dtype: str
    device: str
    decode_timeout_s: float
    prefetch_videos: int
    decode_threads: int = 2  # clips decoded at once in threads, where there are no decoder processes
    decode_processes: int | None = None  # None: decoder_processes_for() picks by device; 0: threads
    codec_threads: int = 0  # FFmpeg threads per clip, 0 = FFmpeg's choice
    input_size: int | None = None  # None: the backbone's own input size
    runtime: str = "auto"  # auto | torch | openvino (jungletrap.runtimes)
    weights: str | None = None  # None: the backbone's published weights; "random"; a path or URL
    pinned_weights: ResolvedWeights | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A worker's ready backbone, the weights it was built from and the runtime it runs on."""

    run: FeatureModel
    weights: ResolvedWeights
    runtime: str


_MODEL_CACHE: dict[tuple[str, str, str, str, int], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()
_builds = 0


def resolve_device(device: str) -> str:
    """``auto`` means the worker's GPU when torch sees one (dask-cuda pins one GPU per worker), else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def runtime_for(settings: EmbedSettings, device: str) -> tuple[str, str]:
    """The (runtime, device) a worker runs the backbone with: OpenVINO always runs on the CPU."""
    runtime = resolve_runtime(settings.runtime, device)
    return runtime, "cpu" if runtime == "openvino" else device


def model_builds() -> int:
    """How many backbones this process has built and compiled (a second partition must reuse the first's)."""
    return _builds


def _model(spec: BackboneSpec, settings: EmbedSettings, device: str, runtime: str) -> LoadedModel:
    global _builds
    size = settings.input_size or spec.input_size
    weights = resolve_weights(spec.name, settings.weights)  # by content: a replaced file is a new model
    key = (spec.name, weights.identity, device, runtime, size)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            if device == "cpu":
                torch.set_num_threads(worker_nthreads(default=torch.get_num_threads()))
                relax_malloc_trim()
            module = build_backbone(spec, device, weights=weights)
            run = compile_backbone(module, runtime=runtime, device=device, input_size=size,
                                   threads=torch.get_num_threads())
            _MODEL_CACHE[key] = LoadedModel(run, weights, runtime)
            _builds += 1
        return _MODEL_CACHE[key]


def _check_pinned(loaded: LoadedModel, settings: EmbedSettings) -> None:
    """Refuse to write a part from other weights than the run's (a worker with another file, or none)."""
    pinned = settings.pinned_weights
    if pinned is not None and loaded.weights.identity != pinned.identity:
        raise WeightsError(
            f"embed.weights: this worker's {pinned.backbone} weights ({loaded.weights.source}, "
            f"{loaded.weights.identity}) differ from the run's ({pinned.source}, {pinned.identity}); every "
            f"worker must hold the same weights file, or parts of one run would mix two networks")


#: Frames per forward pass when ``embed.batch_size`` is null. On a GPU large batches fill the device. On a CPU
#: torch eager wants small ones: a batch's activations stay in cache (EfficientNet-Lite0, 1 thread: 4 frames
#: 41 frames/s, 64 frames 21 frames/s), and the worker's peak memory shrinks with them. OpenVINO keeps 4:
#: bench/embed.py's sweep found 4, 8 and 16 frames a thread within this VM's noise of each other (8 over 4:
#: 1.09, 1.02, 0.78 in three runs), and smaller batches hold less memory.
GPU_BATCH = 64
CPU_BATCH_PER_THREAD = {"torch": 4, "openvino": 4}
#: CPU model threads one decoder process keeps fed: the model runs ~2.3x faster in OpenVINO than in torch
#: eager, so it needs twice the decoders (jungletrap.decoding.decoder_processes_for).
THREADS_PER_DECODER = {"torch": 4, "openvino": 2}


def batch_size_for(settings: EmbedSettings, device: str, runtime: str = "torch") -> int:
    """The configured batch size, or the device's (and on a CPU the runtime's) default."""
    if settings.batch_size:
        return settings.batch_size
    return GPU_BATCH if device.startswith("cuda") else CPU_BATCH_PER_THREAD[runtime] * torch.get_num_threads()


def _run_model(model: LoadedModel, spec: BackboneSpec, frames: np.ndarray, settings: EmbedSettings,
               device: str) -> np.ndarray:
    out = []
    step = batch_size_for(settings, device, model.runtime)
    for start in range(0, len(frames), step):
        with torch.inference_mode():
            batch = torch.from_numpy(frames[start : start + step])
            if device.startswith("cuda"):
                batch = batch.pin_memory().to(device, non_blocking=True)
            x = preprocess(batch, spec)
        out.append(model.run(x))
    return np.concatenate(out) if out else np.zeros((0, spec.feature_dim), np.float32)


def embed_partition(rows: pd.DataFrame, *, settings: EmbedSettings,
                    storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Embed every clip of a catalog partition; the result follows :data:`EMBED_SCHEMA`, one row per input.

    ``storage_options`` (fsspec) open remote clips (``s3://...``) as file objects; local paths need none.
    """
    return embed_partition_backbones(rows, settings=[settings], storage_options=storage_options)[0]


#: Settings every backbone of one decode must share (the sampling, the decoders, where the models run).
SHARED_KEYS = ("sample_fps", "max_seconds", "n_frames", "device", "runtime", "decode_timeout_s", "prefetch_videos",
               "decode_threads", "decode_processes", "codec_threads")


@dataclass
class _Backbone:
    """One backbone's model, input size, output rows and the frames waiting for its next forward pass."""

    settings: EmbedSettings
    spec: BackboneSpec
    model: LoadedModel
    size: int
    records: list[dict[str, Any]]
    buffer: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def flush(self, device: str) -> None:
        if not self.buffer:
            return
        feats = _run_model(self.model, self.spec, np.concatenate([f for _, f in self.buffer]), self.settings, device)
        offset = 0
        for pos, frames in self.buffer:
            n = len(frames)
            self.records[pos][EMBEDDING] = feats[offset : offset + n].astype(np.float16).reshape(-1)  # EMBED_SCHEMA
            offset += n
        self.buffer.clear()


def embed_partition_backbones(rows: pd.DataFrame, *, settings: Sequence[EmbedSettings],
                              storage_options: Mapping[str, Any] | None = None) -> list[pd.DataFrame]:
    """Embed a catalog partition with several backbones from one decode per clip: one frame per backbone, in order.

    Each clip is decoded once and letterboxed at every backbone's input size; a clip that fails is an error row
    in every frame. The settings must agree on :data:`SHARED_KEYS`.
    """
    if not settings:
        raise ValueError("embed_partition_backbones needs at least one backbone's settings")
    first = settings[0]
    differing = [k for k in SHARED_KEYS if any(getattr(s, k) != getattr(first, k) for s in settings)]
    if differing:
        raise ValueError(f"backbones decoded together must share {differing}: "
                         f"{[(s.backbone, [getattr(s, k) for k in differing]) for s in settings]}")
    runtime, device = runtime_for(first, resolve_device(first.device))
    nets = []
    for one in settings:
        spec = get_spec(one.backbone)
        model = _model(spec, one, device, runtime)
        _check_pinned(model, one)
        nets.append(_Backbone(one, spec, model, one.input_size or spec.input_size,
                              [_error_record(r, "not processed") for _, r in rows.iterrows()]))
    batch = batch_size_for(first, device, runtime)
    jobs = [DecodeJob(source=str(path), sample_fps=first.sample_fps, max_seconds=first.max_seconds,
                      n_frames=first.n_frames, size=nets[0].size, timeout_s=first.decode_timeout_s,
                      codec_threads=first.codec_threads, storage_options=storage_options,
                      more_sizes=tuple(net.size for net in nets[1:]))
            for path in rows[PATH]]
    processes = decoder_processes_for(first.decode_processes, device=device,
                                      torch_threads=torch.get_num_threads(), gpus=_gpu_count(device),
                                      threads_per_decoder=THREADS_PER_DECODER[runtime])
    for pos, clip, error in decode_in_order(jobs, processes=processes, threads=first.decode_threads,
                                            ahead=first.prefetch_videos):
        row = rows.iloc[pos]
        if error is not None or clip is None or len(clip.frames) == 0:
            for net in nets:
                net.records[pos] = _error_record(row, error or f"{row[PATH]}: no frame could be decoded")
            continue
        for net in nets:
            frames, stats = clip.at(net.size)
            net.records[pos] = _ok_record(row, clip, len(frames), stats)
            net.buffer.append((pos, frames))
            if sum(len(f) for _, f in net.buffer) >= batch:
                net.flush(device)
    for net in nets:
        net.flush(device)
    return [pd.DataFrame.from_records(net.records, columns=EMBED_SCHEMA.names) for net in nets]


def _gpu_count(device: str) -> int:
    return torch.cuda.device_count() if device.startswith("cuda") else 0


def _ok_record(row: pd.Series, clip: DecodedClip, n_frames: int, stats: Mapping[str, float]) -> dict[str, Any]:
    rec: dict[str, Any] = {VIDEO_ID: row[VIDEO_ID], N_FRAMES: n_frames, EMBEDDING: None}
    rec.update({k: v for k, v in clip.info.as_dict().items() if k in EMBED_SCHEMA.names})
    rec.update(stats)
    rec.update({STATUS: STATUS_OK, ERROR: None})
    return rec


def _error_record(row: pd.Series, error: str) -> dict[str, Any]:
    rec: dict[str, Any] = {name: None for name in EMBED_SCHEMA.names}
    rec.update({VIDEO_ID: row[VIDEO_ID], N_FRAMES: 0, EMBEDDING: np.zeros(0, np.float16)})
    rec.update({SIZE_BYTES: int(row.get(SIZE_BYTES, -1)), STATUS: STATUS_ERROR, ERROR: error})
    return rec
