"""What invalidates what: stage hashes, clip stamps, embeddings copied across a new partitioning.

Hashed must be what changes results and nothing else: evaluation-only test labels re-run the ensemble stage
alone, partition sizes re-cut the catalog and the embedding parts (by copying rows, not decoding) but leave the
later stages done, and a clip replaced under the same name is embedded again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from jungletrap.catalog import build_catalog, catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig, JobConfig
from jungletrap.embed import embed_catalog, read_embedding_meta
from jungletrap.embed_reuse import REUSE_DIR
from jungletrap.features import read_embedding_part
from jungletrap.pipeline import stage_hashes
from jungletrap.schema import CLASS_NAMES, FILENAME, STAMP

from .conftest import real_video_paths

TINY = EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=4.0, batch_size=16)
DOWNSTREAM = ("features", "train", "ensemble")


def _inputs(root: Path, n: int = 6) -> JobConfig:
    """A config over ``n`` small clip files, half labelled, half to predict, with test labels."""
    clips = root / "clips"
    clips.mkdir()
    names = [f"c{i}.mp4" for i in range(n)]
    for i, name in enumerate(names):
        (clips / name).write_bytes(bytes([i]) * (100 + i))
    labels = pd.DataFrame(np.eye(n, len(CLASS_NAMES), dtype=int), columns=list(CLASS_NAMES))
    labels.insert(0, FILENAME, names)
    half = n // 2
    labels[:half].to_csv(root / "train.csv", index=False)
    labels[half:].assign(**dict.fromkeys(CLASS_NAMES, 0.5)).to_csv(root / "format.csv", index=False)
    labels[half:].to_csv(root / "test.csv", index=False)
    cfg = JobConfig()
    cfg.data = cfg.data.model_copy(update={"videos": str(clips), "labels": str(root / "train.csv"),
                                           "submission_format": str(root / "format.csv"),
                                           "test_labels": str(root / "test.csv")})
    return cfg


def _changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {stage for stage in a if a[stage] != b[stage]}


def _replace_keeping_stamp(path: Path, data: bytes) -> None:
    """New content, same size and mtime: what no stamp can see (used to prove a row was copied, not decoded)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_test_labels_rerun_only_the_ensemble(tmp_path: Path) -> None:
    cfg = _inputs(tmp_path)
    before = stage_hashes(cfg)
    other = tmp_path / "other test labels.csv"
    shutil.copy(tmp_path / "test.csv", other)
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_labels": str(other)})})
    assert _changed(before, stage_hashes(moved)) == {"ensemble"}
    (tmp_path / "test.csv").write_text((tmp_path / "test.csv").read_text() + "\n")  # same file, new content
    assert _changed(before, stage_hashes(cfg)) == {"ensemble"}


@pytest.mark.parametrize("key", ["videos_per_partition=2", "partition_bytes=0"])
def test_partition_sizes_rerun_catalog_and_embed_only(tmp_path: Path, key: str) -> None:
    cfg = _inputs(tmp_path)
    name, value = key.split("=")
    cut = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update={name: int(value)})})
    assert _changed(stage_hashes(cfg), stage_hashes(cut)) == {"catalog", "embed"}


def test_a_replaced_clip_changes_the_catalog_and_what_follows(tmp_path: Path) -> None:
    cfg = _inputs(tmp_path)
    before = stage_hashes(cfg)
    clip = tmp_path / "clips" / "c1.mp4"
    catalog = build_catalog(cfg.data, cfg.catalog.model_copy(update={"n_folds": 2}), seed=0).set_index(FILENAME)
    st = clip.stat()
    clip.write_bytes(b"x" * st.st_size)  # same name and size, new content (and so a new mtime)
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))  # a microsecond later: still another version
    replaced = stage_hashes(cfg)
    assert _changed(before, replaced) == set(before)  # every stage: the clip's embedding is another one
    after = build_catalog(cfg.data, cfg.catalog.model_copy(update={"n_folds": 2}), seed=0).set_index(FILENAME)
    assert after.loc["c1.mp4", STAMP] != catalog.loc["c1.mp4", STAMP]
    assert (after.drop(index="c1.mp4")[STAMP] == catalog.drop(index="c1.mp4")[STAMP]).all()
    (tmp_path / "clips" / "unrelated.txt").write_text("not a clip of the run")  # listed, but named by no CSV
    assert stage_hashes(cfg) == replaced


# ---- the embed stage on the cluster ------------------------------------------------------------------------


def _clips(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".mp4", ".avi", ".asf"})


def _embed(client: Client, root: Path, out: Path, tmp_path: Path, per_partition: int) -> dict[str, int]:
    catalog = tmp_path / f"catalog-{per_partition}.parquet"
    write_catalog(catalog_from_paths(_clips(root), root, videos_per_partition=per_partition), catalog)
    return embed_catalog(client, catalog, out, TINY)


def _read_all(out_dir: Path) -> pd.DataFrame:
    return pd.concat([read_embedding_part(str(p)) for p in sorted(out_dir.glob("part-*.parquet"))],
                     ignore_index=True).set_index("video_id")


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.index) == list(b.index)
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    for x, y in zip(a["embedding"], b["embedding"], strict=True):
        np.testing.assert_array_equal(x, y)


def test_new_partition_sizes_copy_rows_instead_of_decoding(dask_client: Client, real_videos_copy: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "emb"
    first = _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=4)
    assert first["embedded"] == len(real_video_paths())
    before = _read_all(out)
    for clip in _clips(real_videos_copy):  # undecodable now, but the stamps cannot tell: only a copy stays "ok"
        _replace_keeping_stamp(clip, bytes(clip.stat().st_size))
    counts = _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=2)
    assert counts["partitions"] == 3 and counts["failed"] == 0, counts
    _same_rows(_read_all(out), before)
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]  # .reuse/ gone
    meta = read_embedding_meta(out / "part-00001.parquet")
    assert [v for v, _ in meta["clips"]] == list(before.index[2:4])
    assert not (out / REUSE_DIR).exists()


def test_a_replaced_clip_is_embedded_again(dask_client: Client, real_videos_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=3)
    clips = _clips(real_videos_copy)
    ids = [str(p.relative_to(real_videos_copy)) for p in clips]
    before = _read_all(out)
    shutil.copyfile(clips[4], clips[0])  # the first clip replaced, same name, another clip's content
    counts = _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=3)
    assert counts["skipped"] == 3 and counts["embedded"] == 3, counts  # only the first partition again
    after = _read_all(out)
    # the same frames through the same model (batched with other clips: equal up to float16 rounding)
    np.testing.assert_allclose(after.loc[ids[0], "embedding"].astype(np.float32),
                               before.loc[ids[4], "embedding"].astype(np.float32), rtol=1e-2, atol=1e-2)
    _same_rows(after.loc[ids[1:]], before.loc[ids[1:]])


def test_an_interrupted_repartition_finds_its_moved_parts_again(dask_client: Client, real_videos_copy: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    import jungletrap.embed as embed_module

    out = tmp_path / "emb"
    _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=6)
    before = _read_all(out)
    for clip in _clips(real_videos_copy):
        _replace_keeping_stamp(clip, bytes(clip.stat().st_size))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(embed_module, "results_as_completed", interrupted)  # the stage stops once the copies are sent
    with pytest.raises(RuntimeError, match="interrupted"):
        _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=2)
    assert list((out / REUSE_DIR).glob("*.parquet"))  # the moved part is kept for the next run
    monkeypatch.undo()
    counts = _embed(dask_client, real_videos_copy, out, tmp_path, per_partition=2)
    assert counts["failed"] == 0
    _same_rows(_read_all(out), before)


# ---- the whole pipeline ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_reruns_only_what_a_change_can_affect(dask_client: Client, tiny_dataset: Path,
                                                       tmp_path: Path) -> None:
    """Partition sizes: catalog and embed (copied rows), nothing after; test labels: the ensemble stage alone."""
    import yaml

    from jungletrap.cluster import ClusterInfo
    from jungletrap.config import load_config
    from jungletrap.pipeline import StageContext, run_pipeline

    from .conftest import write_tiny_config

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    config = write_tiny_config(tmp_path / "tiny.yaml", data, run_root=tmp_path / "runs")
    info = ClusterInfo(kind="local", dashboard_link=None, n_workers=2, gpu=False)

    def run(*overrides: str) -> dict[str, dict[str, object]]:
        cfg = load_config(config, list(overrides))
        return run_pipeline(StageContext(dask_client, cfg, cfg.run_dir(), info))

    run()
    embed_dir = tmp_path / "runs" / "tiny" / "embeddings" / "tiny_cnn"
    before = _read_all(embed_dir)
    for clip in (data / "videos").iterdir():  # undecodable, same stamps: only copied rows stay as they were
        _replace_keeping_stamp(clip, bytes(clip.stat().st_size))
    cut = run("catalog.videos_per_partition=10")
    ran = {stage for stage, counts in cut.items() if not counts.get("stage_skipped")}
    assert ran == {"catalog", "embed"}, cut
    assert cut["embed"]["failed"] == 0
    assert len(list(embed_dir.glob("part-*.parquet"))) == cut["catalog"]["partitions"]
    _same_rows(_read_all(embed_dir), before)
    labels = yaml.safe_load(config.read_text())["data"]["test_labels"]
    shutil.copy(labels, tmp_path / "test labels elsewhere.csv")
    moved = run("catalog.videos_per_partition=10", f"data.test_labels={tmp_path / 'test labels elsewhere.csv'}")
    assert {stage for stage, counts in moved.items() if not counts.get("stage_skipped")} == {"ensemble"}, moved
