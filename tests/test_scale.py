"""Scale rehearsal: ``demo-embeddings`` makes valid embed-stage artifacts; a stage out of memory says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client
from jungletrap.udfs.embed import EMBED_SCHEMA

from jungletrap.catalog import CATALOG_NAME, catalog_from_paths, write_catalog
from jungletrap.cluster import StageMemoryError, explain_lost_workers, open_client
from jungletrap.config import ClusterConfig, load_config
from jungletrap.embed import embed_catalog, part_path, read_embedding_meta
from jungletrap.features import read_embedding_part
from jungletrap.manifest import Manifest
from jungletrap.pipeline import stage_hashes
from jungletrap.schema import CLASS_NAMES, SPLIT, SPLIT_TEST
from jungletrap.synthetic_embeddings import RehearsalSpec, plan_catalog, rehearsal_config, write_rehearsal
from tests.conftest import real_video_paths

SMALL = RehearsalSpec(n=80, dim=64, frames=6, seed=3, videos_per_partition=16)


@pytest.fixture(scope="module")
def rehearsal(dask_client: Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rehearsal") / "rehearsal"
    write_rehearsal(dask_client, out, SMALL)
    return out


def _real_part(client: Client, tmp_path: Path, rehearsal: Path) -> Path:
    """A part the real embed stage writes, with the rehearsal's embed settings, from two real clips."""
    paths = real_video_paths()[:2]
    catalog = tmp_path / CATALOG_NAME
    write_catalog(catalog_from_paths(paths, paths[0].parent, videos_per_partition=8), catalog)
    embed_catalog(client, catalog, tmp_path / "emb", load_config(rehearsal / "config.yaml").embed)
    return part_path(tmp_path / "emb", 0)


def test_rehearsal_parts_have_the_embed_stage_schema_and_metadata(dask_client: Client, rehearsal: Path,
                                                                  tmp_path: Path) -> None:
    real = _real_part(dask_client, tmp_path, rehearsal)
    parts = sorted((rehearsal / "embeddings" / "tiny_cnn").glob("part-*.parquet"))
    assert len(parts) == pd.read_parquet(rehearsal / CATALOG_NAME)["partition"].nunique() >= 5
    real_meta = read_embedding_meta(real)
    for part in parts:
        assert pq.read_schema(part).remove_metadata().equals(pq.read_schema(real).remove_metadata())
        assert pq.read_schema(part).remove_metadata().equals(EMBED_SCHEMA)
        assert pq.read_schema(part).metadata.keys() == pq.read_schema(real).metadata.keys()
        meta = read_embedding_meta(part)
        assert meta.keys() == real_meta.keys()
        assert {k: v for k, v in meta.items() if k not in ("rows_hash", "n_rows", "clips")} == \
               {k: v for k, v in real_meta.items() if k not in ("rows_hash", "n_rows", "clips")}


def test_the_embed_stage_takes_rehearsal_parts_as_complete(dask_client: Client, rehearsal: Path) -> None:
    cfg = load_config(rehearsal / "config.yaml")
    manifest = Manifest(rehearsal)
    hashes = stage_hashes(cfg)
    assert manifest.is_done("catalog", hashes["catalog"]) and manifest.is_done("embed", hashes["embed"])
    # the clips do not exist: a part not taken as complete would be re-embedded as error rows
    counts = embed_catalog(dask_client, rehearsal / CATALOG_NAME, rehearsal / "embeddings" / "tiny_cnn", cfg.embed)
    assert counts["embedded"] == 0 and counts["skipped"] == SMALL.n


def test_rehearsal_rows_have_variable_frames_errors_and_labels(rehearsal: Path) -> None:
    frame = pd.concat([read_embedding_part(p) for p in sorted((rehearsal / "embeddings" / "tiny_cnn").glob("*"))],
                      ignore_index=True)
    catalog = pd.read_parquet(rehearsal / CATALOG_NAME)
    assert list(frame["video_id"]) == list(catalog["video_id"])
    ok = frame[frame["status"] == "ok"]
    assert (frame["status"] == "error").sum() >= 1 and ok["n_frames"].min() == 1 and ok["n_frames"].max() == 6
    assert all(e.dtype == np.float16 and e.size == n * 64 for e, n in zip(ok["embedding"], ok["n_frames"],
                                                                          strict=True))
    assert ok.loc[ok["n_frames"] == 1, "motion_mean"].isna().all()
    test = pd.read_csv(rehearsal / "test_labels.csv")
    assert list(pd.read_csv(rehearsal / "submission_format.csv")["filename"]) == list(test["filename"])
    assert sorted(test["filename"]) == sorted(catalog.loc[catalog[SPLIT] == SPLIT_TEST, "filename"])


def test_rehearsal_labels_follow_the_competition_imbalance(tmp_path: Path) -> None:
    spec = RehearsalSpec(n=6000, dim=64, frames=6)
    catalog, plan = plan_catalog(spec, rehearsal_config(tmp_path / "r", spec))
    share = pd.DataFrame(np.stack(plan["labels"].to_numpy()), columns=list(CLASS_NAMES)).mean()
    assert share.idxmax() == "blank" and 0.5 < share["blank"] < 0.6
    assert share.drop("blank").idxmax() == "chimpanzee"
    assert (share < 0.005).sum() >= 10 and catalog["video_id"].is_unique
    assert abs((catalog[SPLIT] == SPLIT_TEST).mean() - 0.3) < 0.01
    assert (plan["kind"] == "error").sum() == 18 and (plan["kind"] == "one_frame").sum() == 60


def test_demo_embeddings_refuses_a_dimension_no_backbone_has() -> None:
    with pytest.raises(ValueError, match="--dim 100: no registered backbone.*1280 \\(efficientnet_lite0\\)"):
        RehearsalSpec(n=100, dim=100)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "jungletrap"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_runs_from_demo_embeddings_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "rehearsal"
    made = _cli("demo-embeddings", "--out", str(out), "--n", "160", "--dim", "64", "--frames", "6", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    again = _cli("demo-embeddings", "--out", str(out), "--n", "160", "--dim", "64", cwd=tmp_path)
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    run = _cli("run", "--config", str(out / "config.yaml"), "--set", "train.xgb.n_estimators=15",
               "--set", "train.head.epochs=2", "--set", "train.head.hidden=8", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "catalog: already done" in run.stderr and "embed: already done" in run.stderr
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission["filename"]) == list(pd.read_csv(out / "submission_format.csv")["filename"])
    metrics = pd.read_json(out / "metrics.json", typ="series")
    assert metrics["oof"]["blend"]["mean_log_loss"] < metrics["prior_baseline_oof"]["mean_log_loss"]


@pytest.mark.slow
def test_pipeline_runs_from_a_two_backbone_demo_embeddings_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "rehearsal"
    both = "--backbones", "tiny_cnn,efficientnet_lite0"
    refused = _cli("demo-embeddings", "--out", str(out), "--n", "100", "--dim", "64", *both, cwd=tmp_path)
    assert refused.returncode == 2 and "--dim or --backbones" in refused.stderr
    made = _cli("demo-embeddings", "--out", str(out), "--n", "100", "--frames", "4", *both, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert load_config(out / "config.yaml").embed.backbone_names == ["tiny_cnn", "efficientnet_lite0"]
    run = _cli("run", "--config", str(out / "config.yaml"), "--set", "train.xgb.n_estimators=8",
               "--set", "train.head.epochs=1", "--set", "train.head.hidden=8", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "embed: already done" in run.stderr
    columns = pq.read_schema(out / "features" / "part-00000.parquet").names
    assert "emb_mean_0063" in columns and "emb_efficientnet_lite0_max_1279" in columns
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission["filename"]) == list(pd.read_csv(out / "submission_format.csv")["filename"])
    metrics = pd.read_json(out / "metrics.json", typ="series")
    assert metrics["models"] == ["xgb", "head", "head_efficientnet_lite0"]
    assert metrics["oof"]["blend"]["mean_log_loss"] < metrics["prior_baseline_oof"]["mean_log_loss"]


def test_a_task_that_outgrows_its_worker_fails_naming_the_stage_and_the_limit() -> None:
    cfg = ClusterConfig(kind="cpu", n_workers=1, memory_limit="400MiB")
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), open_client(cfg) as (client, _):
        with pytest.raises(StageMemoryError) as err, explain_lost_workers(client, "features"):
            client.submit(np.ones, 2**28, pure=False).result()  # 2 GiB of float64
    text = str(err.value)
    assert text.startswith("features: task") and "killed its worker 2 times" in text and "400.00 MiB" in text
    assert "cluster.memory_limit" in text


def test_the_report_lists_a_bounded_number_of_failed_videos() -> None:
    from jungletrap.report import MAX_FAILURES_SHOWN, _failures

    failed = pd.DataFrame({"video_id": [f"v{i}.mp4" for i in range(1000)], "error": ["x: cannot decode"] * 1000})
    page = _failures(failed)
    assert page.count("<tr>") <= MAX_FAILURES_SHOWN + 1 and "1000 video(s)" in page and "first 200" in page
