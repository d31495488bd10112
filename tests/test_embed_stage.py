"""Embed stage on a real 2-process cluster: real clips, error rows, Parquet schema/metadata, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client
from jungletrap.udfs.embed import EMBED_SCHEMA

from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig
from jungletrap.embed import (
    TooManyFailures,
    embed_catalog,
    embed_catalog_partition,
    embed_settings,
    part_path,
    read_embedding_meta,
)
from jungletrap.feature_fit import FeatureTransform
from jungletrap.features import features_part, read_embedding_part, transform_part

from .conftest import real_video_paths

TINY = EmbedConfig(backbone="tiny_cnn", sample_fps=3.0, max_seconds=15.0, batch_size=16)


def _catalog(tmp_path: Path, root: Path, extra: list[Path], per_partition: int) -> Path:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".mp4", ".avi", ".asf"}) + extra
    path = tmp_path / f"catalog-{per_partition}.parquet"
    write_catalog(catalog_from_paths(paths, root, videos_per_partition=per_partition), path)
    return path


def _read_all(out_dir: Path) -> pd.DataFrame:
    return pd.concat([read_embedding_part(str(p)) for p in sorted(out_dir.glob("part-*.parquet"))],
                     ignore_index=True)


@pytest.fixture()
def corpus(real_videos_copy: Path) -> tuple[Path, list[Path]]:
    (real_videos_copy / "broken clip.avi").write_text("this is not a video")  # listed with the real clips
    return real_videos_copy, [real_videos_copy / "gone.mp4"]  # in the catalog, absent on disk


def test_real_clips_embed_and_broken_ones_become_error_rows(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, extra = corpus
    catalog = _catalog(tmp_path, root, extra, per_partition=3)
    out = tmp_path / "emb"
    counts = embed_catalog(dask_client, catalog, out, TINY)
    frame = _read_all(out)
    assert len(frame) == len(real_video_paths()) + 2 and frame["video_id"].is_unique
    assert counts == {"partitions": 3, "videos": 8, "embedded": 6, "skipped": 0, "failed": 2, "warnings": 0}
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 6
    # real clips are 1 fps: 3 fps x 15 s keeps each real frame once -> 15; the 6-frame clip gives 6 and the
    # Abel AVI lacks its frame at t=1 s (packets 0, 2, 3, ...) -> 14 distinct pictures in [0, 15 s)
    assert sorted(ok["n_frames"].tolist()) == [6, 14, 15, 15, 15, 15]
    for emb, n in zip(ok["embedding"], ok["n_frames"], strict=True):
        assert emb.dtype == np.float16 and emb.size == n * 64 and np.isfinite(emb).all()
    errors = frame.set_index("video_id").loc[["broken clip.avi", "gone.mp4"]]
    assert (errors["status"] == "error").all() and (errors["n_frames"] == 0).all()
    assert "broken clip.avi" in errors.loc["broken clip.avi", "error"]
    assert "gone.mp4" in errors.loc["gone.mp4", "error"]
    schema = pq.read_schema(part_path(out, 0))
    assert schema.remove_metadata().equals(EMBED_SCHEMA)
    meta = read_embedding_meta(part_path(out, 0))
    assert meta["backbone"] == "tiny_cnn" and meta["feature_dim"] == 64 and meta["max_frames"] == 45


def test_same_video_same_embedding_whatever_partition_or_batch(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, extra = corpus
    a = tmp_path / "a"
    b = tmp_path / "b"
    embed_catalog(dask_client, _catalog(tmp_path, root, extra, per_partition=2), a, TINY)
    embed_catalog(dask_client, _catalog(tmp_path, root, extra, per_partition=8), b,
                  TINY.model_copy(update={"batch_size": 5, "decode_threads": 1, "codec_threads": 1}))
    fa, fb = _read_all(a).set_index("video_id"), _read_all(b).set_index("video_id")
    assert sorted(fa.index) == sorted(fb.index)
    for vid in fa.index[fa["status"] == "ok"]:
        np.testing.assert_allclose(fa.loc[vid, "embedding"].astype(np.float32),
                                   fb.loc[vid, "embedding"].astype(np.float32), rtol=1e-2, atol=1e-2)


def test_resume_recomputes_only_missing_parts(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, extra = corpus
    catalog = _catalog(tmp_path, root, extra, per_partition=3)
    out = tmp_path / "emb"
    embed_catalog(dask_client, catalog, out, TINY)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    part_path(out, 1).unlink()
    (out / ".part-00002.parquet.tmp-deadbeef").write_bytes(b"half written")
    counts = embed_catalog(dask_client, catalog, out, TINY)
    assert counts["skipped"] == 5 and counts["videos"] == 8  # parts of 3, 3, 2 videos
    assert counts["failed"] == 2  # every part's error rows, not only those of the part embedded again
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert after["part-00000.parquet"] == stamps["part-00000.parquet"]
    assert after["part-00002.parquet"] == stamps["part-00002.parquet"]
    assert "part-00001.parquet" in after
    assert not list(out.glob(".*tmp-*"))
    assert _read_all(out)["video_id"].is_unique and len(_read_all(out)) == 8
    # a change of performance settings keeps every part; a change of sampling or input size invalidates them
    counts = embed_catalog(dask_client, catalog, out, TINY.model_copy(update={"decode_threads": 3,
                                                                           "codec_threads": 1}))
    assert counts["skipped"] == 8
    counts = embed_catalog(dask_client, catalog, out, TINY.model_copy(update={"sample_fps": 1.0}))
    assert counts["skipped"] == 0
    counts = embed_catalog(dask_client, catalog, out, TINY.model_copy(update={"sample_fps": 1.0, "input_size": 96}))
    assert counts["skipped"] == 0 and read_embedding_meta(part_path(out, 0))["input_size"] == 96


def test_failed_count_covers_the_parts_embedded_before_a_resume(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """The error rows live in parts of the first run; the resumed run embeds only a part without any."""
    root, extra = corpus
    catalog = _catalog(tmp_path, root, extra, per_partition=3)
    out = tmp_path / "emb"
    embed_catalog(dask_client, catalog, out, TINY)
    clean = next(p for p in sorted(out.glob("part-*.parquet")) if (pd.read_parquet(p)["status"] == "ok").all())
    clean.unlink()
    counts = embed_catalog(dask_client, catalog, out, TINY)
    assert counts["failed"] == 2 and counts["videos"] == 8 and counts["embedded"] == 3 and counts["skipped"] == 5
    counts = embed_catalog(dask_client, catalog, out, TINY)  # nothing left to embed (as after --force)
    assert counts == {"partitions": 3, "videos": 8, "embedded": 0, "skipped": 8, "failed": 2, "warnings": 0}


def test_too_many_failures_stop_the_stage_naming_the_count_and_reasons(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, extra = corpus
    catalog = _catalog(tmp_path, root, [*extra, root / "gone too.mp4"], per_partition=3)
    out = tmp_path / "emb"
    with pytest.raises(TooManyFailures) as err:
        embed_catalog(dask_client, catalog, out, TINY, max_failed_fraction=0.25)
    message = str(err.value)
    assert "3 of 9 videos failed (33.3%, more than run.max_failed_fraction=0.25)" in message
    assert "commonest reasons: file not found (2); not a readable video container" in message
    assert err.value.counts["failed"] == 3
    # Re-run: the error rows of the parts already written count again.
    with pytest.raises(TooManyFailures, match="3 of 9 videos failed"):
        embed_catalog(dask_client, catalog, out, TINY, max_failed_fraction=0.25)
    counts = embed_catalog(dask_client, catalog, out, TINY, max_failed_fraction=1 / 3)  # at the limit: goes on
    assert counts["failed"] == 3 and counts["videos"] == 9


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_part_tasks_run_again_return_the_part_already_written(
    corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A task the scheduler runs again (its worker died after writing) must not redo or rewrite the part."""
    root, extra = corpus
    catalog = _catalog(tmp_path, root, extra, per_partition=3)
    settings = embed_settings(TINY)
    part = tmp_path / "emb" / "part-00002.parquet"
    first = embed_catalog_partition(catalog, 2, part, settings)
    written = _stamp(part)
    again = embed_catalog_partition(catalog, 2, part, settings)
    assert again == {**first, "reused": True} and not first["reused"] and _stamp(part) == written
    assert first["videos"] == 2 and first["failed"] == 1 and first["reasons"] == {"file not found": 1}

    out = tmp_path / "features" / "part-00002.parquet"
    meta = {b"jungletrap": json.dumps({"artifact": "features", "pooling": ["mean"]}).encode()}
    assert features_part(part, out, embed_dim=64, pooling=["mean"], metadata=meta) == 2
    written = _stamp(out)
    assert features_part(part, out, embed_dim=64, pooling=["mean"], metadata=meta) == 2 and _stamp(out) == written
    transform = FeatureTransform({})
    assert transform_part(out, transform, "t1") == 2 and _stamp(out) != written
    written = _stamp(out)
    assert transform_part(out, transform, "t1") == 2 and _stamp(out) == written
    assert transform_part(out, transform, "t2") == 2 and _stamp(out) != written  # another transform: applied
