"""Shared bench helpers: seed-like clips, median timing, a printed table and results.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jungletrap.synthetic import write_clip

__all__ = ["seed_clips", "median_seconds", "print_table", "save_results", "update_results", "machine",
           "worker_peak_rss_mib", "RESULTS_PATH"]

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"

#: The seed's sampling on the benchmark clips: 15 s 640x360 H.264 at 30 fps, sampled at 3 fps x 15 s.
CLIP_SECONDS, CLIP_FPS, CLIP_W, CLIP_H = 15.0, 30.0, 640, 360
SAMPLE_FPS, MAX_SECONDS = 3.0, 15.0


def seed_clips(out_dir: Path, n: int) -> list[Path]:
    """``n`` synthetic 640x360 15 s H.264 clips (reused when already written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out_dir / f"seed_clip_{i:04d}.mp4"
        if not path.exists():
            write_clip(path, classes=["chimpanzee"] if i % 2 else ["blank"], seed=i, width=CLIP_W, height=CLIP_H,
                       fps=CLIP_FPS, seconds=CLIP_SECONDS)
        paths.append(path)
    return paths


def median_seconds(fn: Callable[[], Any], *, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls (after one warm-up call) and the raw times."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(title: str, rows: list[tuple[str, Any, str]]) -> None:
    print(f"\n{title}")
    width = max((len(r[0]) for r in rows), default=0)
    for key, value, note in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown:>12}  {note}")


def save_results(section: str, values: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = values
    data["machine"] = machine()
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def update_results(section: str, values: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    """Merge ``values`` into ``section``, keeping its other keys: a partial rerun must not drop the figures of
    the parts it did not rerun."""
    data = json.loads(path.read_text()) if path.exists() else {}
    save_results(section, {**data.get(section, {}), **values}, path)


def _peak_rss_of(pid: int | str) -> float:
    """Peak resident set (VmHWM) of a live process in MiB, from /proc (Linux); 0 when it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def worker_peak_rss_mib() -> float:
    """Run on a Dask worker: its peak RSS plus its decoder processes' (each process's own peak, summed: an
    upper bound of the worker's footprint, since the peaks need not coincide)."""
    from jungletrap.decoding import decoder_pids

    return _peak_rss_of("self") + sum(_peak_rss_of(pid) for pid in decoder_pids())
