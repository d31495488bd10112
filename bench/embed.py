"""Embed benchmark: decode vs the naive loader, model-only floor vs the whole stage through Dask.

Run: ``python -m bench.embed [--clips 8] [--repeats 3] [--backbone efficientnet_lite0]``. On the seed's
sampling (3 fps x 15 s of 640x360 30 fps H.264, 224x224 input) it measures, in one run on the same clips:
- ``decode_s_per_video``: ``read_clip``; ``naive_decode_s_per_video``: every frame decoded with OpenCV,
  converted to RGB, every k-th kept and resized; ``decode_speedup`` = naive / ours;
- ``model_only_s_per_video``: the backbone on frames already in memory, same threads and batch size;
- ``stage_s_per_video``: the embed stage on a 1-worker x 1-thread LocalCluster, files to Parquet;
  ``stage_over_model`` = stage / model-only (target <= 1.1: decode and I/O hidden behind inference);
- frames/s of the model and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from distributed import Client, LocalCluster
from jungletrap.udfs.embed import _run_model

from bench.common import MAX_SECONDS, SAMPLE_FPS, median_seconds, print_table, save_results, seed_clips
from jungletrap.backbones import build_backbone, get_spec
from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig
from jungletrap.embed import embed_catalog, embed_settings
from jungletrap.video import read_clip

CACHE = Path(__file__).resolve().parent / ".cache"


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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(clips: list[Path], *, backbone: str, repeats: int, batch_size: int) -> dict[str, Any]:
    spec = get_spec(backbone)
    n = len(clips)
    ours = lambda: [read_clip(p, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, size=spec.input_size)  # noqa: E731
                    for p in clips]
    naive = lambda: [naive_decode(p, keep_every=10, size=spec.input_size) for p in clips]  # noqa: E731
    decode_s, _ = median_seconds(ours, repeats=repeats)
    naive_s, _ = median_seconds(naive, repeats=repeats)

    torch.set_num_threads(1)
    cfg = EmbedConfig(backbone=backbone, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, batch_size=batch_size,
                      device="cpu")
    settings = embed_settings(cfg)
    model = build_backbone(spec, "cpu")
    frames = np.concatenate([f for f, _ in ours()])
    model_s, _ = median_seconds(lambda: _run_model(model, spec, frames, settings, "cpu"), repeats=repeats)

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        catalog = work / "catalog.parquet"
        write_catalog(catalog_from_paths(clips, clips[0].parent, videos_per_partition=n), catalog)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            runs = iter(range(repeats + 1))
            stage_s, _ = median_seconds(
                lambda: embed_catalog(client, catalog, work / f"out{next(runs)}", cfg), repeats=repeats)
            rss = max(client.run(_peak_rss_mib).values())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "backbone": backbone,
        "videos": n,
        "frames_per_video": len(frames) / n,
        "decode_s_per_video": decode_s / n,
        "naive_decode_s_per_video": naive_s / n,
        "decode_speedup": naive_s / decode_s,
        "model_only_s_per_video": model_s / n,
        "model_frames_per_s": len(frames) / model_s,
        "stage_s_per_video": stage_s / n,
        "stage_over_model": stage_s / model_s,
        "stage_worker_peak_rss_mib": rss,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    clips = seed_clips(CACHE / "seed_clips", args.clips)
    result = measure(clips, backbone=args.backbone, repeats=args.repeats, batch_size=args.batch_size)
    result["bench_seconds"] = time.perf_counter() - start
    print_table(f"embed ({args.backbone}, {args.clips} clips 640x360 15 s, 3 fps x 15 s, 224 px, medians of "
                f"{args.repeats}; 1 thread)", [
        ("decode_s_per_video", result["decode_s_per_video"], "read_clip"),
        ("naive_decode_s_per_video", result["naive_decode_s_per_video"], "OpenCV: all frames -> RGB, keep 1/10"),
        ("decode_speedup", result["decode_speedup"], "naive / ours (target >= 2.5)"),
        ("model_only_s_per_video", result["model_only_s_per_video"], "frames in memory"),
        ("model_frames_per_s", result["model_frames_per_s"], ""),
        ("stage_s_per_video", result["stage_s_per_video"], "Dask 1 worker x 1 thread, files -> Parquet"),
        ("stage_over_model", result["stage_over_model"], "target <= 1.1"),
        ("stage_worker_peak_rss_mib", result["stage_worker_peak_rss_mib"], ""),
    ])
    save_results("embed", result)
    return result


if __name__ == "__main__":
    main()
