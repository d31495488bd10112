"""Shared fixtures: a real 2-process Dask cluster, the real camera-trap clips, small generated datasets."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

REPO = Path(__file__).resolve().parents[1]
REAL_VIDEOS = REPO.parent / "shared" / "fixtures" / "real_videos"
VIDEO_SUFFIXES = {".mp4", ".avi", ".asf", ".mkv"}


def real_video_paths() -> list[Path]:
    """The real camera-trap fixture clips (a missing fixture directory is a failure, not a skip)."""
    assert REAL_VIDEOS.is_dir(), f"real video fixtures missing: expected {REAL_VIDEOS} (../shared beside the repo)"
    paths = sorted(p for p in REAL_VIDEOS.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    assert len(paths) >= 6, f"expected the 6 real clips under {REAL_VIDEOS}, found {len(paths)}"
    return paths


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """One LocalCluster for the suite: 2 worker processes (so pickling and worker imports are real)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the competition layout (generated once per session)."""
    from jungletrap.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_dataset(out, n_videos=120, seed=7, n_jobs=2)
    return out


@pytest.fixture()
def real_videos_copy(tmp_path: Path) -> Path:
    """A writable copy of the real clips (keeping their odd nested paths)."""
    dest = tmp_path / "real videos"
    shutil.copytree(REAL_VIDEOS, dest)
    return dest
