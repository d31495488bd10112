"""Embed stage on a real 2-process cluster: real clips, error rows, Parquet schema/metadata, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client, get_task_stream
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


# -- several backbones, one decode ----------------------------------------------------------------------------------

#: Two backbones at different input sizes (64 and 224 px): a cheap one and a real one, 2 frames a clip.
TWO = EmbedConfig(backbones=["tiny_cnn", "efficientnet_lite0"], n_frames=2, batch_size=16, decode_processes=0)


def _embed_tasks(stream: list[dict[str, object]]) -> set[str]:
    """The partition tasks in a task stream (not the counting of parts already complete)."""
    return {str(t["key"]) for t in stream
            if str(t["key"]).startswith("embed-") and not str(t["key"]).startswith("embed-count")}


def _dirs(root: Path, cfg: EmbedConfig) -> dict[str, Path]:
    return {name: root / name for name in cfg.backbone_names}


def test_one_decode_feeds_every_backbone_and_each_gets_what_it_gets_alone(
    corpus: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jungletrap.udfs.embed import embed_partition, embed_partition_backbones

    from jungletrap import decoding

    root, extra = corpus
    rows = pd.read_parquet(_catalog(tmp_path, root, extra, per_partition=50))
    decodes: list[tuple[str, tuple[int, ...]]] = []
    real = decoding.read_clip_sizes

    def counting(source: object, **kwargs: object) -> object:
        decodes.append((str(getattr(source, "name", source)), tuple(kwargs["sizes"])))  # type: ignore[arg-type]
        return real(source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decoding, "read_clip_sizes", counting)  # decode_processes=0: decoded in this process
    settings = [embed_settings(TWO, name) for name in TWO.backbone_names]
    together = embed_partition_backbones(rows, settings=settings)
    assert len(decodes) == len(rows) and len({name for name, _ in decodes}) == len(rows)  # each clip once
    assert all(sizes == (64, 224) for _, sizes in decodes)
    decodes.clear()
    for one, frame in zip(settings, together, strict=True):
        alone = embed_partition(rows, settings=one)
        pd.testing.assert_frame_equal(frame.drop(columns=["embedding"]), alone.drop(columns=["embedding"]))
        assert all(np.array_equal(a, b) for a, b in zip(frame["embedding"], alone["embedding"], strict=True))
    assert len(decodes) == 2 * len(rows)  # alone: one decode per backbone
    assert together[0]["status"].tolist() == together[1]["status"].tolist()
    ok = together[1]["status"] == "ok"
    assert [len(e) for e in together[1].loc[ok, "embedding"]] == [1280 * n for n in together[1].loc[ok, "n_frames"]]


def test_adding_a_backbone_embeds_only_the_new_one_and_leaves_existing_parts_untouched(
    dask_client: Client, corpus: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, extra = corpus
    catalog = _catalog(tmp_path, root, extra, per_partition=3)
    one = TWO.model_copy(update={"backbones": None, "backbone": "tiny_cnn"})
    first = embed_catalog(dask_client, catalog, _dirs(tmp_path / "emb", one), one)
    tiny_parts = sorted((tmp_path / "emb" / "tiny_cnn").glob("part-*.parquet"))
    before = {p.name: (_stamp(p), p.read_bytes()) for p in tiny_parts}

    with get_task_stream(client=dask_client) as stream:
        added = embed_catalog(dask_client, catalog, _dirs(tmp_path / "emb", TWO), TWO)
    assert {p.name: (_stamp(p), p.read_bytes()) for p in tiny_parts} == before  # not rewritten, not touched
    lite = sorted((tmp_path / "emb" / "efficientnet_lite0").glob("part-*.parquet"))
    assert [p.name for p in lite] == list(before)
    assert added["embedded"] == first["embedded"] and added["skipped"] == 0 and added["failed"] == first["failed"]
    # one task per partition (both backbones would share its decode; here only lite0 runs)
    assert len(_embed_tasks(stream.data)) == len(lite)
    assert all(read_embedding_meta(p)["backbone"] == "efficientnet_lite0" for p in lite)

    # The same datasets as a clean run of both backbones at once (each partition: one task, one decode).
    clean = tmp_path / "clean"
    with get_task_stream(client=dask_client) as stream:
        embed_catalog(dask_client, catalog, _dirs(clean, TWO), TWO)
    assert len(_embed_tasks(stream.data)) == len(lite)
    for name in TWO.backbone_names:
        pd.testing.assert_frame_equal(_read_all(clean / name), _read_all(tmp_path / "emb" / name))
    again = embed_catalog(dask_client, catalog, _dirs(tmp_path / "emb", TWO), TWO)
    assert again["embedded"] == 0 and again["skipped"] == first["videos"]


def test_several_backbones_need_a_directory_each() -> None:
    with pytest.raises(ValueError, match="one output directory each"):
        embed_catalog(None, Path("catalog.parquet"), Path("emb"), TWO)  # type: ignore[arg-type]
