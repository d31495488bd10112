"""Memory benchmark: peak embed-worker RSS for a catalog 10x larger, and the client's RSS growth.

Run: ``python -m bench.memory [--small 200] [--large 2000]``. Each size runs the embed stage on a fresh
2-worker x 1-thread LocalCluster (peak RSS is a process-lifetime maximum, so clusters are not reused) with the
real EfficientNet-Lite0, the same partition size (``--per-partition``) and batch size, on short generated clips
(1 s, 160x96, one sampled frame each, so 2,000 clips take about a minute). Memory per worker is meant to be
bounded by partition and batch size, not by catalog size: ``peak_rss_growth`` = large / small - 1 (target <= 0.10).
``client_rss_growth_mib`` is how much the client process grew during the large run: the client only ever sees
per-partition counts, never embeddings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from distributed import Client, LocalCluster

from bench.common import print_table, save_results, worker_peak_rss_mib
from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig
from jungletrap.decoding import allow_worker_subprocesses
from jungletrap.synthetic import write_clip

CACHE = Path(__file__).resolve().parent / ".cache" / "memory_clips"


def short_clips(n: int) -> list[Path]:
    """``n`` one-second 160x96 H.264 clips (written once, reused)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = CACHE / f"clip_{i:05d}.mp4"
        if not path.exists():
            write_clip(path, classes=["blank"] if i % 3 else ["elephant"], seed=i, width=160, height=96, fps=4,
                       seconds=1)
        paths.append(path)
    return paths


def run_size(clips: list[Path], *, per_partition: int, batch_size: int | None) -> dict[str, Any]:
    from jungletrap.embed import embed_catalog  # torch: decoder processes import the main module, keep it light

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    client_proc = psutil.Process()
    try:
        catalog = work / "catalog.parquet"
        write_catalog(catalog_from_paths(clips, clips[0].parent, videos_per_partition=per_partition), catalog)
        cfg = EmbedConfig(backbone="efficientnet_lite0", sample_fps=1.0, max_seconds=1.0, batch_size=batch_size,
                          device="cpu")
        allow_worker_subprocesses()  # as open_client does
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            client_before = client_proc.memory_info().rss
            start = time.perf_counter()
            counts = embed_catalog(client, catalog, work / "embeddings", cfg)
            seconds = time.perf_counter() - start
            client_after = client_proc.memory_info().rss
            peaks = client.run(worker_peak_rss_mib)
        assert counts["failed"] == 0 and counts["embedded"] == len(clips), counts
        return {"videos": len(clips), "seconds": seconds, "worker_peak_rss_mib": max(peaks.values()),
                "client_rss_growth_mib": (client_after - client_before) / 2**20}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--per-partition", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the UDF's own choice")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    clips = short_clips(args.large)
    small = run_size(clips[: args.small], per_partition=args.per_partition, batch_size=args.batch_size)
    large = run_size(clips, per_partition=args.per_partition, batch_size=args.batch_size)
    result = {
        "peak_rss_mib_small": small["worker_peak_rss_mib"],
        "peak_rss_mib_large": large["worker_peak_rss_mib"],
        "peak_rss_growth": large["worker_peak_rss_mib"] / small["worker_peak_rss_mib"] - 1,
        "client_rss_growth_mib": large["client_rss_growth_mib"],
        "small": small,
        "large": large,
        "per_partition": args.per_partition,
        "batch_size": args.batch_size,
        "load_avg_1m": os.getloadavg()[0],
        "bench_seconds": time.perf_counter() - begin,
    }
    print_table(f"memory (EfficientNet-Lite0, 2 workers x 1 thread, {args.per_partition} clips per partition, "
                f"batch {args.batch_size or 'auto'})", [
        ("peak_rss_mib_small", result["peak_rss_mib_small"], f"{args.small} clips, max over workers"),
        ("peak_rss_mib_large", result["peak_rss_mib_large"], f"{args.large} clips"),
        ("peak_rss_growth", result["peak_rss_growth"], "large / small - 1 (target <= 0.10)"),
        ("client_rss_growth_mib", result["client_rss_growth_mib"], "client process during the large run"),
        ("large_videos_per_s", args.large / large["seconds"], ""),
    ])
    save_results("memory", result)
    return result


if __name__ == "__main__":
    main()
