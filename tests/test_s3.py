"""Data in object storage: a real S3 API (moto server on 127.0.0.1), nested keys with spaces, the real clips.

The catalog lists the bucket with one paginated listing and reads the CSVs from it; workers open the clips
themselves as file objects, with credentials from their environment and only the endpoint in the config.
Request counts are taken by the server (every HTTP request it received), not estimated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from jungletrap.catalog import build_catalog, write_catalog
from jungletrap.config import CatalogConfig, DataConfig, EmbedConfig
from jungletrap.embed import embed_catalog
from jungletrap.features import read_embedding_part
from jungletrap.schema import CLASS_NAMES, FILENAME
from jungletrap.storage import list_files

from .conftest import REAL_VIDEOS, S3Server, real_video_paths, upload_tree

TINY = EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=6.0, batch_size=16)


def _csv(files: list[str], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.integers(0, 2, (len(files), len(CLASS_NAMES))), columns=list(CLASS_NAMES))
    frame.insert(0, FILENAME, files)
    return frame.to_csv(index=False).encode()


@pytest.fixture()
def clips_in_s3(s3_server: S3Server, tmp_path: Path) -> tuple[DataConfig, DataConfig]:
    """The real clips (nested, odd names) + a broken one in a bucket under a prefix with spaces, the CSVs beside
    them, and the same layout in a local folder; returns the (s3, local) data configs."""
    fs = s3_server.fs()
    bucket = f"jt-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(bucket)
    local = tmp_path / "camera traps"
    shutil.copytree(REAL_VIDEOS, local / "real clips")
    (local / "real clips" / "broken clip.avi").write_text("this is not a video")
    upload_tree(fs, local, f"s3://{bucket}/camera traps")
    names = [p.name for p in real_video_paths()]  # bare names: resolved in nested folders
    train, test = [*names[:4], "broken clip.avi", "gone.mp4"], names[4:]
    for name, files, seed in (("train_labels.csv", train, 0), ("submission_format.csv", test, 1)):
        fs.pipe_file(f"s3://{bucket}/{name}", _csv(files, seed))
        (tmp_path / name).write_bytes(_csv(files, seed))
    s3 = DataConfig(videos=f"s3://{bucket}/camera traps", labels=f"s3://{bucket}/train_labels.csv",
                    submission_format=f"s3://{bucket}/submission_format.csv", storage_options=s3_server.options)
    here = DataConfig(videos=str(local), labels=str(tmp_path / "train_labels.csv"),
                      submission_format=str(tmp_path / "submission_format.csv"))
    return s3, here


def test_catalog_from_s3_matches_the_local_folder(clips_in_s3: tuple[DataConfig, DataConfig],
                                                  s3_server: S3Server) -> None:
    s3, here = clips_in_s3
    cfg = CatalogConfig(n_folds=2, videos_per_partition=3)
    before = s3_server.count()
    remote = build_catalog(s3, cfg, seed=0)
    requests = s3_server.count() - before
    local = build_catalog(here, cfg, seed=0)
    assert requests <= 6, s3_server.requests[-requests:]  # 2 CSVs (HEAD + GET each) + 1 listing; no per-clip call
    cols = ["video_id", "size_bytes", "split", "fold", "partition", *CLASS_NAMES]
    pd.testing.assert_frame_equal(remote[cols], local[cols])
    paths = remote.set_index("video_id")["path"]
    assert paths["PICT0074.ASF"] == f"{s3.videos}/real clips/chimpandsee/Trip_5/card 1.2_location/PICT0074.ASF"
    assert paths["gone.mp4"] == f"{s3.videos}/gone.mp4"
    assert remote.set_index("video_id").loc["gone.mp4", "size_bytes"] == -1


def test_workers_embed_clips_from_s3_like_local_ones(clips_in_s3: tuple[DataConfig, DataConfig],
                                                    dask_client: Client, tmp_path: Path) -> None:
    s3, here = clips_in_s3
    cfg = CatalogConfig(n_folds=2, videos_per_partition=3)
    frames = {}
    for name, data in (("s3", s3), ("local", here)):
        catalog = tmp_path / f"{name}.parquet"
        write_catalog(build_catalog(data, cfg, seed=0), catalog)
        out = tmp_path / f"emb-{name}"
        counts = embed_catalog(dask_client, catalog, out, TINY, storage_options=data.storage_options)
        assert counts["embedded"] == 6 and counts["failed"] == 2, counts
        frames[name] = pd.concat([read_embedding_part(str(p)) for p in sorted(out.glob("part-*.parquet"))],
                                 ignore_index=True).set_index("video_id")
    remote, local = frames["s3"], frames["local"]
    assert list(remote.index) == list(local.index)
    assert (remote["status"] == local["status"]).all() and (remote["n_frames"] == local["n_frames"]).all()
    for vid in remote.index[remote["status"] == "ok"]:
        np.testing.assert_array_equal(remote.loc[vid, "embedding"], local.loc[vid, "embedding"])
    assert remote.loc["gone.mp4", "error"] == f"{s3.videos}/gone.mp4: file not found"
    assert remote.loc["broken clip.avi", "error"].startswith(f"{s3.videos}/real clips/broken clip.avi: ")


def test_listing_ten_thousand_objects_takes_a_bounded_number_of_requests(s3_server: S3Server) -> None:
    fs = s3_server.fs()
    fs.mkdir("jt-many")
    n = 10_000
    for i in range(n):  # set-up straight into moto's store: only the listing below is counted
        s3_server.put_object_directly("jt-many", f"videos/site {i % 7}/cam {i % 13}/clip {i:05d}.mp4", b"v" * (i % 5))
    before = s3_server.count()
    listing = list_files("s3://jt-many/videos", s3_server.options)
    requests = s3_server.requests[before:]
    files = listing[listing["size_bytes"] >= 0]  # the folders (size -1) come from the same listing
    assert len(files) == n and files["size_bytes"].sum() == sum(i % 5 for i in range(n))
    assert len(listing) - n == 7 + 7 * 13
    assert len(requests) <= n // 1000 + 2, requests  # ListObjectsV2 pages of 1,000 keys, not a request per key
    assert all(method == "GET" and "list-type=2" in query for method, _, query in requests)
    # the catalog of a few of them costs the same listing plus the two CSVs, whatever the bucket holds
    names = sorted(files["relpath"].str.rsplit("/", n=1).str[-1])
    fs.pipe_file("s3://jt-many/train_labels.csv", _csv(names[:30], 0))
    fs.pipe_file("s3://jt-many/submission_format.csv", _csv(names[30:40], 1))
    data = DataConfig(videos="s3://jt-many/videos", labels="s3://jt-many/train_labels.csv",
                      submission_format="s3://jt-many/submission_format.csv", storage_options=s3_server.options)
    before = s3_server.count()
    catalog = build_catalog(data, CatalogConfig(n_folds=2), seed=0)
    assert s3_server.count() - before <= n // 1000 + 6
    assert (catalog["size_bytes"] >= 0).all() and catalog["path"].str.startswith("s3://jt-many/videos/site ").all()
