"""Embed benchmark: decode vs the naive loader, torch vs OpenVINO, model-only floor vs the whole stage, scaling.

Run: ``python -m bench.embed [--clips 8] [--repeats 3] [--backbone efficientnet_lite0] [--demo-dir data/demo]``;
``python -m bench.embed --per-backbone-only [--repeats 3]`` measures ``per_backbone`` alone and merges it into
the saved ``embed`` entry.
On the seed's sampling (3 fps x 15 s of 640x360 30 fps H.264, 224x224 input) it measures, in one run on the
same clips:
- ``model_sweep_frames_per_s``: model-only frames/s of torch eager and OpenVINO (``embed.runtime``) on 1 thread
  and on all threads, at several batch sizes, the runtimes alternating; ``openvino_over_torch_1_thread`` /
  ``_all_threads``: their ratio, each at its default batch (target >= 2);
- ``runtimes``: model-only and stage seconds per video and ``stage_over_model`` for each runtime (the keys
  below are for the stage's default runtime, ``runtime``: OpenVINO where installed);
- ``demo_embed``: the demo's embed stage (conf/demo.yaml, its 400 clips from ``make demo-data``) in clips/s
  for each runtime, when ``--demo-dir`` holds the clips;
- ``decode_s_per_video``: ``read_clip``; ``naive_decode_s_per_video``: every frame decoded with OpenCV,
  converted to RGB, every k-th kept and resized; ``decode_speedup`` = naive / ours;
- ``model_only_s_per_video``: the backbone on frames already in memory, run *inside the stage's worker
  process* (same model cache, threads, allocator settings and batch size as the UDF);
- ``stage_s_per_video``: the embed stage on a 1-worker x 1-thread LocalCluster, files to Parquet, the clips in
  one partition, decoded in the worker's decoder process; ``stage_decode_threads_s_per_video``: the same with
  decode threads inside the worker (``embed.decode_processes: 0``);
  ``stage_over_model`` = stage / model-only (target <= 1.1: decode and I/O hidden behind inference). Model-only
  and stage runs alternate, so load from elsewhere hits both alike;
- ``scaling_2_over_1``: stage throughput on 2 workers x 1 thread over 1 worker x 1 thread (target >= 1.8), the
  same two-partition catalog on both; beside it ``model_parallel_ceiling``: model-only throughput of both
  workers at once over one alone, which the stage cannot beat (and ``cpu_parallel_ceiling``, pure Python);
- frames/s of the model and the worker's peak RSS (see bench/memory.py for RSS against catalog size);
- ``per_backbone``: what each EfficientNet-Lite variant costs per frame on a CPU worker: model-only frames/s
  and frames per CPU-second at its own input size (Lite0 224, Lite1 240, Lite2 260 px), torch and OpenVINO,
  1 thread, each runtime at its default batch, and ``<runtime>_cost_over_efficientnet_lite0`` /
  ``<runtime>_cpu_cost_over_efficientnet_lite0``: wall / CPU time per frame relative to Lite0's (CPU time is
  the steadier where other work shares the machine).

torch is imported inside the functions, not by this module: decoder processes are spawned and import the main
module (``python -m bench.embed`` makes it this one), which must stay light.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from distributed import Client, LocalCluster

from bench.common import (
    MAX_SECONDS,
    SAMPLE_FPS,
    median_seconds,
    print_table,
    save_results,
    seed_clips,
    update_results,
    worker_peak_rss_mib,
)
from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig
from jungletrap.decoding import allow_worker_subprocesses
from jungletrap.video import read_clip

if TYPE_CHECKING:
    from jungletrap.udfs.embed import EmbedSettings

CACHE = Path(__file__).resolve().parent / ".cache"
#: The backbones ``per_backbone`` compares, the first being the reference of the cost ratios.
PER_BACKBONE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_RUNTIMES = ("torch", "openvino")


def naive_decode(path: Path, *, keep_every: int, size: int) -> np.ndarray:
    """The loader most users write: decode and convert every frame, keep every k-th, resize."""
    cap = cv2.VideoCapture(str(path))
    frames, i = [], 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if i % keep_every == 0:
            frames.append(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA))
        i += 1
    cap.release()
    return np.stack(frames)


def decode_floor(path: Path, *, references_only: bool) -> int:
    """Decode without converting anything: every frame, or only the frames others predict from (the floor for
    any loader that must reproduce the frames on screen; H.264 P-frames are references)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if references_only:
            stream.codec_context.skip_frame = "NONREF"
        return sum(1 for _ in container.decode(stream))


def _spin(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def cpu_parallel_ceiling(n: int = 10**7) -> float:
    """Throughput of two processes spinning at once over one alone: what this machine gives 2 workers.

    Shared or throttled vCPUs (and other work on them) can hold it well under 2; ``scaling_2_over_1`` cannot
    beat it, so the two are printed side by side.
    """
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_spin, [n // 10] * 2))  # start both processes before timing
        alone = statistics.median(pool.submit(_spin, n).result() for _ in range(3))
        together = statistics.median(max(pool.map(_spin, [n, n])) for _ in range(3))
    return 2 * alone / together


def _model_only_seconds(clips: list[str], settings: EmbedSettings) -> float:
    """On the worker: decode the clips (untimed), then time the UDF's own model call on all their frames."""
    from jungletrap.udfs.embed import _model, _run_model, resolve_device, runtime_for

    from jungletrap.backbones import get_spec

    spec = get_spec(settings.backbone)
    runtime, device = runtime_for(settings, resolve_device(settings.device))
    frames = np.concatenate([read_clip(p, sample_fps=settings.sample_fps, max_seconds=settings.max_seconds,
                                       size=spec.input_size)[0] for p in clips])
    model = _model(spec, settings, device, runtime)
    start = time.perf_counter()
    _run_model(model, spec, frames, settings, device)
    return time.perf_counter() - start


def _frames_per_s(run: Any, x: Any, *, min_seconds: float) -> float:
    """Frames/s of ``run`` on the batch ``x``, repeated for at least ``min_seconds`` after one warm-up call."""
    run(x)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds:
        run(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def _frames_per_s_wall_and_cpu(run: Any, x: Any, *, min_seconds: float) -> tuple[float, float]:
    """As :func:`_frames_per_s`, and also frames per CPU-second of this process: on a shared machine a
    1-thread model descheduled by others loses wall time but not CPU time, so CPU-time ratios are steadier."""
    run(x)
    start, cpu_start, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < min_seconds:
        run(x)
        n += len(x)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)


def model_sweep(frames: np.ndarray, *, backbone: str, threads: list[int], batches: list[int], rounds: int,
                min_seconds: float = 1.5) -> dict[str, dict[str, dict[str, float]]]:
    """Model-only frames/s of torch eager and OpenVINO, by threads and batch size, medians of ``rounds``.

    In this process, on the real network and preprocessed frames; the runtimes alternate within every round
    so load from elsewhere hits both alike. Returns ``{runtime: {threads: {batch: frames/s}}}``.
    """
    import torch

    from jungletrap.backbones import build_backbone, get_spec, preprocess
    from jungletrap.runtimes import compile_backbone

    spec = get_spec(backbone)
    module = build_backbone(spec)
    x_all = preprocess(torch.from_numpy(frames[: max(batches)]), spec)
    out: dict[str, dict[str, dict[str, float]]] = {"torch": {}, "openvino": {}}
    saved = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            runs = {rt: compile_backbone(module, runtime=rt, device="cpu", input_size=spec.input_size,
                                         threads=n_threads) for rt in ("torch", "openvino")}
            times: dict[tuple[str, int], list[float]] = {}
            for _ in range(rounds):
                for batch in batches:
                    for rt, run in runs.items():
                        fps = _frames_per_s(run, x_all[:batch], min_seconds=min_seconds)
                        times.setdefault((rt, batch), []).append(fps)
            for (rt, batch), values in times.items():
                out[rt].setdefault(str(n_threads), {})[str(batch)] = statistics.median(values)
    finally:
        torch.set_num_threads(saved)
    return out


def per_backbone(clip: Path, *, backbones: tuple[str, ...] = PER_BACKBONE, rounds: int,
                 min_seconds: float = 0.5) -> dict[str, Any]:
    """Model-only frames/s of each backbone at its own input size, torch and OpenVINO, 1 thread, each runtime at
    its default batch: what one more backbone costs per decoded frame on a CPU worker.

    Frames come from ``clip`` at each backbone's size (decoding untimed). Every (backbone, runtime) pair runs once
    per round, in turn, for ``min_seconds`` (short, so the pairs interleave finely), so load from elsewhere hits
    all alike; the ratios are medians of per-round ratios, which drift between rounds on a shared machine does
    not bias.
    """
    import torch
    from jungletrap.udfs.embed import CPU_BATCH_PER_THREAD

    from jungletrap.backbones import build_backbone, get_spec, preprocess
    from jungletrap.runtimes import compile_backbone

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name in backbones:
            spec = get_spec(name)
            module = build_backbone(spec)
            frames = read_clip(clip, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, size=spec.input_size)[0]
            for rt in _RUNTIMES:
                x = preprocess(torch.from_numpy(frames[:CPU_BATCH_PER_THREAD[rt]]), spec)
                runs[name, rt] = (compile_backbone(module, runtime=rt, device="cpu", input_size=spec.input_size,
                                                   threads=1), x)
        fps: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        cpu_fps: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, (run, x) in runs.items():
                wall, cpu = _frames_per_s_wall_and_cpu(run, x, min_seconds=min_seconds)
                fps[key].append(wall)
                cpu_fps[key].append(cpu)
    finally:
        torch.set_num_threads(saved)
    frames_per_video = SAMPLE_FPS * MAX_SECONDS
    out: dict[str, Any] = {"threads": 1, "rounds": rounds, "frames_per_video": frames_per_video,
                           "batch": {rt: CPU_BATCH_PER_THREAD[rt] for rt in _RUNTIMES}}
    for name in backbones:
        entry: dict[str, Any] = {"input_size": get_spec(name).input_size, "feature_dim": get_spec(name).feature_dim}
        for rt in _RUNTIMES:
            entry[f"{rt}_frames_per_s"] = statistics.median(fps[name, rt])
            entry[f"{rt}_frames_per_cpu_s"] = statistics.median(cpu_fps[name, rt])
            entry[f"{rt}_model_s_per_video"] = frames_per_video / entry[f"{rt}_frames_per_s"]
            entry[f"{rt}_cost_over_{backbones[0]}"] = _median_ratio(fps[backbones[0], rt], fps[name, rt])
            entry[f"{rt}_cpu_cost_over_{backbones[0]}"] = _median_ratio(cpu_fps[backbones[0], rt],
                                                                        cpu_fps[name, rt])
        entry["openvino_over_torch"] = _median_ratio(fps[name, "openvino"], fps[name, "torch"])
        entry["openvino_over_torch_cpu"] = _median_ratio(cpu_fps[name, "openvino"], cpu_fps[name, "torch"])
        out[name] = entry
    out["raw_frames_per_s"] = {f"{name}_{rt}": values for (name, rt), values in fps.items()}
    out["raw_frames_per_cpu_s"] = {f"{name}_{rt}": values for (name, rt), values in cpu_fps.items()}
    out["load_avg_1m"] = os.getloadavg()[0]
    return out


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def _per_backbone_rows(table: dict[str, Any]) -> list[tuple[str, Any, str]]:
    base = PER_BACKBONE[0]
    rows: list[tuple[str, Any, str]] = []
    for name in PER_BACKBONE:
        entry = table[name]
        for rt in _RUNTIMES:
            rows.append((f"{name}_{entry['input_size']}px_{rt}_frames_per_s", entry[f"{rt}_frames_per_s"],
                         f"model only, 1 thread, batch {table['batch'][rt]}"))
            rows.append((f"{name}_{rt}_frames_per_cpu_s", entry[f"{rt}_frames_per_cpu_s"], "per CPU-second"))
            rows.append((f"{name}_{rt}_cost_over_{base}", entry[f"{rt}_cost_over_{base}"], "wall time per frame"))
            rows.append((f"{name}_{rt}_cpu_cost_over_{base}", entry[f"{rt}_cpu_cost_over_{base}"],
                         "CPU time per frame"))
        rows.append((f"{name}_openvino_over_torch", entry["openvino_over_torch"], "wall"))
        rows.append((f"{name}_openvino_over_torch_cpu", entry["openvino_over_torch_cpu"], "CPU time"))
    return rows


def _warm(path: str, settings: EmbedSettings) -> None:
    """On every worker: build the model and start the decoder processes, so no timed run pays for either
    (Dask need not place a warm-up partition on each worker)."""
    import pandas as pd
    from jungletrap.udfs.embed import embed_partition

    rows = pd.DataFrame({"video_id": ["warm"], "path": [path], "size_bytes": [os.path.getsize(path)]})
    assert (embed_partition(rows, settings=settings)["status"] == "ok").all()


def _models_alone_and_together(client: Client, paths: list[str], settings: EmbedSettings,
                               repeats: int) -> tuple[list[float], list[float]]:
    """Model-only seconds on half the clips: on one worker alone, then on both workers at once (the slower).

    What two workers' models get from this machine at once: shared caches, memory bandwidth, SMT siblings. The
    stage's ``scaling_2_over_1`` cannot beat ``model_parallel_ceiling`` = 2 x alone / together.
    """
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    half = len(paths) // 2
    alone, together = [], []
    for _ in range(repeats):
        alone.append(client.submit(_model_only_seconds, paths[:half], settings, workers=workers[:1],
                                   pure=False).result())
        both = [client.submit(_model_only_seconds, paths[i * half:(i + 1) * half], settings, workers=[w],
                              pure=False) for i, w in enumerate(workers[:2])]
        together.append(max(f.result() for f in both))
    return alone, together


def _stage_seconds(client: Client, catalog: Path, out: Path, cfg: EmbedConfig) -> float:
    from jungletrap.embed import embed_catalog

    start = time.perf_counter()
    counts = embed_catalog(client, catalog, out, cfg)
    assert counts["failed"] == 0, counts
    return time.perf_counter() - start


def _sweep_batches(threads: list[int]) -> list[int]:
    """Each runtime's default batch at each thread count, and a few around them."""
    from jungletrap.udfs.embed import CPU_BATCH_PER_THREAD

    return sorted({b * t for t in threads for b in CPU_BATCH_PER_THREAD.values()} | {4, 8, 16})


def _default_batch_ratio(sweep: dict[str, dict[str, dict[str, float]]], threads: int) -> float:
    """OpenVINO over torch frames/s, each at its own default batch size for ``threads``."""
    from jungletrap.udfs.embed import CPU_BATCH_PER_THREAD

    at = {rt: sweep[rt][str(threads)][str(CPU_BATCH_PER_THREAD[rt] * threads)] for rt in ("torch", "openvino")}
    return at["openvino"] / at["torch"]


def measure(clips: list[Path], *, backbone: str, repeats: int, batch_size: int | None) -> dict[str, Any]:
    from jungletrap.backbones import get_spec
    from jungletrap.embed import embed_settings
    from jungletrap.runtimes import resolve_runtime

    spec = get_spec(backbone)
    n = len(clips)
    ours = lambda: [read_clip(p, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, size=spec.input_size)  # noqa: E731
                    for p in clips]
    naive = lambda: [naive_decode(p, keep_every=10, size=spec.input_size) for p in clips]  # noqa: E731
    decode_s, _ = median_seconds(ours, repeats=repeats)
    naive_s, _ = median_seconds(naive, repeats=repeats)
    full_s, _ = median_seconds(lambda: [decode_floor(p, references_only=False) for p in clips], repeats=repeats)
    refs_s, _ = median_seconds(lambda: [decode_floor(p, references_only=True) for p in clips], repeats=repeats)
    frames_in_clips = sum(decode_floor(p, references_only=False) for p in clips)
    reference_frames = sum(decode_floor(p, references_only=True) for p in clips)
    frames_total = sum(len(f) for f, _ in ours())
    all_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sweep_threads = sorted({1, all_threads})
    sweep = model_sweep(np.concatenate([f for f, _ in ours()]), backbone=backbone, threads=sweep_threads,
                        batches=_sweep_batches(sweep_threads), rounds=repeats)

    ceiling = cpu_parallel_ceiling()
    cfg = EmbedConfig(backbone=backbone, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, batch_size=batch_size,
                      device="cpu")
    runtime = resolve_runtime(cfg.runtime, "cpu")  # what the stage's default (auto) uses here
    per_runtime = {rt: cfg.model_copy(update={"runtime": rt}) for rt in ("torch", "openvino")}
    threads_cfg = cfg.model_copy(update={"decode_processes": 0})  # the old way: decode threads in the worker
    settings = embed_settings(cfg)
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    runs = iter(range(10_000))
    try:
        # One partition for stage vs model-only (a real partition holds ~100 clips, so filling and draining the
        # decode pipeline is amortised; with 4 clips a partition it would be a third of the overhead measured).
        # Two partitions, one per worker, for the scaling runs on 1 and 2 workers.
        catalog = work / "catalog.parquet"
        write_catalog(catalog_from_paths(clips, clips[0].parent, videos_per_partition=n), catalog)
        halves = work / "catalog-2.parquet"
        write_catalog(catalog_from_paths(clips, clips[0].parent, videos_per_partition=(n + 1) // 2), halves)
        allow_worker_subprocesses()  # as open_client does: the worker may start decoder processes
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            paths = [str(p) for p in clips]
            for rt_cfg in per_runtime.values():
                client.run(_warm, paths[0], embed_settings(rt_cfg))
            rt_model: dict[str, list[float]] = {rt: [] for rt in per_runtime}
            rt_stage: dict[str, list[float]] = {rt: [] for rt in per_runtime}
            threads_times, one_times = [], []
            for r in range(repeats + 1):  # the first round warms the model cache and the page cache
                for rt, rt_cfg in per_runtime.items():
                    model_s = client.submit(_model_only_seconds, paths, embed_settings(rt_cfg), pure=False).result()
                    stage_s = _stage_seconds(client, catalog, work / f"out{next(runs)}", rt_cfg)
                    if r:
                        rt_model[rt].append(model_s)
                        rt_stage[rt].append(stage_s)
                threads_s = _stage_seconds(client, catalog, work / f"out{next(runs)}", threads_cfg)
                one_s = _stage_seconds(client, halves, work / f"out{next(runs)}", cfg)
                if r:
                    threads_times.append(threads_s)
                    one_times.append(one_s)
            rss = max(client.run(worker_peak_rss_mib).values())
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            client.run(_warm, str(clips[0]), settings)
            _stage_seconds(client, halves, work / f"out{next(runs)}", cfg)
            two_times = [_stage_seconds(client, halves, work / f"out{next(runs)}", cfg) for _ in range(repeats)]
            alone_times, together_times = _models_alone_and_together(client, [str(p) for p in clips], settings,
                                                                    repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model_times, stage_times = rt_model[runtime], rt_stage[runtime]
    model_s, stage_s, threads_s, one_s, two_s, alone_s, together_s = (statistics.median(t) for t in (
        model_times, stage_times, threads_times, one_times, two_times, alone_times, together_times))
    runtimes = {rt: {"model_only_s_per_video": statistics.median(rt_model[rt]) / n,
                     "model_frames_per_s": frames_total / statistics.median(rt_model[rt]),
                     "stage_s_per_video": statistics.median(rt_stage[rt]) / n,
                     "stage_over_model": statistics.median(rt_stage[rt]) / statistics.median(rt_model[rt])}
                for rt in per_runtime}
    return {
        "backbone": backbone,
        "runtime": runtime,
        "videos": n,
        "frames_per_video": frames_total / n,
        "decode_s_per_video": decode_s / n,
        "naive_decode_s_per_video": naive_s / n,
        "decode_speedup": naive_s / decode_s,
        "full_decode_s_per_video": full_s / n,
        "reference_decode_s_per_video": refs_s / n,
        "reference_frame_share": reference_frames / frames_in_clips,
        "decode_speedup_ceiling": naive_s / refs_s,
        "model_sweep_frames_per_s": sweep,
        "openvino_over_torch_1_thread": _default_batch_ratio(sweep, 1),
        "openvino_over_torch_all_threads": _default_batch_ratio(sweep, all_threads),
        "all_threads": all_threads,
        "runtimes": runtimes,
        "openvino_over_torch_stage": runtimes["torch"]["stage_s_per_video"] / runtimes["openvino"]["stage_s_per_video"],
        "model_only_s_per_video": model_s / n,
        "model_frames_per_s": frames_total / model_s,
        "stage_s_per_video": stage_s / n,
        "stage_over_model": stage_s / model_s,
        "stage_decode_threads_s_per_video": threads_s / n,
        "stage_decode_threads_over_model": threads_s / model_s,
        "stage_2_workers_s_per_video": two_s / n,
        "scaling_2_over_1": one_s / two_s,
        "cpu_parallel_ceiling": ceiling,
        "model_parallel_ceiling": 2 * alone_s / together_s,
        "stage_worker_peak_rss_mib": rss,
        "raw_seconds": {"model": model_times, "stage": stage_times, "stage_decode_threads": threads_times,
                        "stage_2_parts_1_worker": one_times, "model_alone": alone_times,
                        "model_together": together_times, "stage_2_parts_2_workers": two_times,
                        **{f"model_{rt}": rt_model[rt] for rt in per_runtime},
                        **{f"stage_{rt}": rt_stage[rt] for rt in per_runtime}},
        "load_avg_1m": os.getloadavg()[0],
    }


def demo_embed(demo_dir: Path, *, config: Path, runtimes: tuple[str, ...] = ("torch", "openvino")) -> dict[str, Any]:
    """The demo's embed stage (its config's sampling and partitions, 2 workers x 1 thread), clips/s per runtime.

    Needs the demo clips (``make demo-data``); each runtime embeds them once into a fresh directory, after a
    warm-up partition, so model builds and decoder start-up are not timed.
    """
    from jungletrap.config import load_config
    from jungletrap.embed import embed_catalog, embed_settings

    cfg = load_config(config)
    extensions = {e.lower() for e in cfg.catalog.extensions}
    clips = sorted(p for p in (demo_dir / "videos").rglob("*") if p.suffix.lower() in extensions)
    work = Path(tempfile.mkdtemp(prefix="bench-demo-embed-"))
    out: dict[str, Any] = {"clips": len(clips), "config": str(config)}
    try:
        catalog = work / "catalog.parquet"
        write_catalog(catalog_from_paths(clips, clips[0].parent,
                                         videos_per_partition=cfg.catalog.videos_per_partition), catalog)
        allow_worker_subprocesses()
        with LocalCluster(n_workers=cfg.cluster.n_workers, threads_per_worker=cfg.cluster.threads_per_worker,
                          processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            for rt in runtimes:
                rt_cfg = cfg.embed.model_copy(update={"runtime": rt, "device": "cpu"})
                client.run(_warm, str(clips[0]), embed_settings(rt_cfg))
                start = time.perf_counter()
                counts = embed_catalog(client, catalog, work / f"out-{rt}", rt_cfg)  # the demo has broken clips
                out[f"{rt}_clips_per_s"] = len(clips) / (time.perf_counter() - start)
                out["failed"] = counts["failed"]
        out["openvino_over_torch"] = out["openvino_clips_per_s"] / out["torch_clips_per_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the UDF's own choice")
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"),
                        help="demo clips for the demo embed-stage figure (skipped when absent)")
    parser.add_argument("--per-backbone-only", action="store_true",
                        help="measure per_backbone alone and merge it into the saved embed entry")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    clips = seed_clips(CACHE / "seed_clips", args.clips)
    if args.per_backbone_only:
        table = per_backbone(clips[0], rounds=args.repeats)
        print_table(f"embed per backbone (medians of {args.repeats} rounds)", _per_backbone_rows(table))
        update_results("embed", {"per_backbone": table})
        return {"per_backbone": table}
    result = measure(clips, backbone=args.backbone, repeats=args.repeats, batch_size=args.batch_size)
    result["per_backbone"] = per_backbone(clips[0], rounds=args.repeats)
    if (args.demo_dir / "videos").is_dir():
        result["demo_embed"] = demo_embed(args.demo_dir, config=Path(__file__).resolve().parents[1] / "conf" /
                                          "demo.yaml")
    result["bench_seconds"] = time.perf_counter() - start
    rt = result["runtimes"]
    print_table(f"embed ({args.backbone}, {args.clips} clips 640x360 15 s, 3 fps x 15 s, 224 px, medians of "
                f"{args.repeats}; 1 thread; stage runtime {result['runtime']})", [
        ("decode_s_per_video", result["decode_s_per_video"], "read_clip"),
        ("naive_decode_s_per_video", result["naive_decode_s_per_video"], "OpenCV: all frames -> RGB, keep 1/10"),
        ("decode_speedup", result["decode_speedup"], "naive / ours (target >= 2.5)"),
        ("full_decode_s_per_video", result["full_decode_s_per_video"], "decode every frame, convert none"),
        ("reference_decode_s_per_video", result["reference_decode_s_per_video"],
         "decode only reference frames: the floor"),
        ("reference_frame_share", result["reference_frame_share"], "frames that must be decoded"),
        ("decode_speedup_ceiling", result["decode_speedup_ceiling"], "naive / floor"),
        *[(f"{name}_frames_per_s_{t}t_b{b}", fps, "model only, in this process")
          for name, by_threads in result["model_sweep_frames_per_s"].items()
          for t, by_batch in by_threads.items() for b, fps in by_batch.items()],
        ("openvino_over_torch_1_thread", result["openvino_over_torch_1_thread"],
         "model only, each at its default batch (target >= 2)"),
        ("openvino_over_torch_all_threads", result["openvino_over_torch_all_threads"],
         f"the same on {result['all_threads']} threads"),
        *[(f"{name}_{key}", value, "") for name, values in rt.items() for key, value in values.items()],
        ("openvino_over_torch_stage", result["openvino_over_torch_stage"], "embed stage, 1 worker x 1 thread"),
        ("model_only_s_per_video", result["model_only_s_per_video"], "frames in memory"),
        ("model_frames_per_s", result["model_frames_per_s"], ""),
        ("stage_s_per_video", result["stage_s_per_video"], "Dask 1 worker x 1 thread, files -> Parquet"),
        ("stage_over_model", result["stage_over_model"], "target <= 1.1"),
        ("stage_decode_threads_s_per_video", result["stage_decode_threads_s_per_video"],
         "the same with decode threads in the worker (decode_processes 0)"),
        ("stage_decode_threads_over_model", result["stage_decode_threads_over_model"], ""),
        ("stage_2_workers_s_per_video", result["stage_2_workers_s_per_video"], "2 workers x 1 thread"),
        ("scaling_2_over_1", result["scaling_2_over_1"], "target >= 1.8"),
        ("cpu_parallel_ceiling", result["cpu_parallel_ceiling"], "2 processes spinning vs 1: this machine's cap"),
        ("model_parallel_ceiling", result["model_parallel_ceiling"],
         "2 workers' models at once vs 1 alone (model-only): the cap for scaling_2_over_1"),
        ("stage_worker_peak_rss_mib", result["stage_worker_peak_rss_mib"], "worker + its decoder processes"),
        *[(f"demo_embed_{key}", value, "demo config, 2 workers x 1 thread")
          for key, value in result.get("demo_embed", {}).items() if key.endswith(("per_s", "over_torch"))],
        *_per_backbone_rows(result["per_backbone"]),
        ("load_avg_1m", result["load_avg_1m"], "at the end: other work on this machine"),
    ])
    save_results("embed", result)
    return result


if __name__ == "__main__":
    main()
