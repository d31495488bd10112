"""The whole pipeline through the CLI in a subprocess, on a tiny generated set with the real backbone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from jungletrap.schema import CLASS_NAMES, FILENAME

from .conftest import REPO, real_video_paths

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "jungletrap")


def _write_config(tmp: Path, data: Path) -> Path:
    cfg = {
        "run": {"name": "e2e", "root": str(tmp / "runs")},
        "data": {"videos": str(data / "videos"), "labels": str(data / "train_labels.csv"),
                 "submission_format": str(data / "submission_format.csv"),
                 "test_labels": str(data / "test_labels.csv")},
        "cluster": {"kind": "cpu", "n_workers": 2, "threads_per_worker": 1},
        "catalog": {"videos_per_partition": 16, "n_folds": 3},
        "embed": {"backbone": "efficientnet_lite0", "sample_fps": 1.0, "max_seconds": 4.0, "batch_size": 16},
        "train": {"xgb": {"n_estimators": 80, "max_depth": 3, "colsample_bytree": 0.3},
                  "head": {"hidden": 32, "max_frames": 4, "epochs": 20}},
    }
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def finished_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("e2e")
    config = _write_config(tmp, tiny_dataset)
    proc = _cli("run", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config, tmp / "runs" / "e2e", proc.stdout


def test_submission_matches_format_exactly(finished_run: tuple[Path, Path, str], tiny_dataset: Path) -> None:
    _, run_dir, stdout = finished_run
    assert "dask dashboard: http://127.0.0.1" in stdout and "submission:" in stdout
    sub = pd.read_csv(run_dir / "submission.csv")
    fmt = pd.read_csv(tiny_dataset / "submission_format.csv")
    assert list(sub.columns) == [FILENAME, *CLASS_NAMES]
    assert sub[FILENAME].tolist() == fmt[FILENAME].tolist()
    values = sub[list(CLASS_NAMES)].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all() and (values < 1).all()


def test_feature_table_has_real_pooled_embeddings(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = finished_run
    feats = pd.read_parquet(run_dir / "features")
    ok = feats[feats["status"] == "ok"]
    pooled = [c for c in feats.columns if c.startswith("emb_")]
    assert len(pooled) == 2 * 1280 and len(ok) == len(feats)
    assert np.isfinite(ok[pooled].to_numpy()).all()
    from jungletrap.features import read_embedding_part  # each pooled column is its statistic of the frames

    parts = sorted((run_dir / "embeddings" / "efficientnet_lite0").glob("part-*.parquet"))
    frames = pd.concat([read_embedding_part(p) for p in parts]).set_index("video_id")["embedding"]
    for _, row in ok.head(5).iterrows():
        clip = frames[row["video_id"]].astype(np.float32).reshape(-1, 1280)
        for stat, pool in (("mean", clip.mean(axis=0)), ("max", clip.max(axis=0))):
            got = row[[f"emb_{stat}_{d:04d}" for d in range(1280)]].to_numpy(np.float32)
            np.testing.assert_allclose(got, pool, rtol=1e-3, atol=1e-3)
    assert {"bytes_per_second_rel", "motion_p90"} <= set(feats.columns)


def test_blend_beats_the_class_prior_out_of_fold(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    prior = metrics["prior_baseline_oof"]["mean_log_loss"]
    assert set(metrics["oof"]) == {"xgb", "head", "blend"}
    blend = metrics["oof"]["blend"]["mean_log_loss"]
    assert blend < prior
    best_single = min(metrics["oof"]["xgb"]["mean_log_loss"], metrics["oof"]["head"]["mean_log_loss"])
    if blend > best_single:  # the blend's OOF is nested and may lose on a tiny set: the report must say so
        assert "is above the best single model" in (run_dir / "report.html").read_text()
    assert metrics["ensemble"]["method"] in metrics["ensemble"]["nested_oof_log_loss"]
    assert (run_dir / "models" / "ensemble.json").exists()
    for model in ("xgb", "head"):
        oof = pd.read_parquet(run_dir / "oof" / f"{model}.parquet")
        assert oof["video_id"].is_unique and len(oof) == metrics["oof"][model]["n_videos"]


def test_manifest_report_and_skip_on_rerun(finished_run: tuple[Path, Path, str]) -> None:
    config, run_dir, _ = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("catalog", "embed", "features", "train", "ensemble")] == [
        "done"] * 5
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    before = (run_dir / "submission.csv").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("already done for this config, skipped") == 5
    assert (run_dir / "submission.csv").stat().st_mtime_ns == before


def test_stage_job_reruns_when_its_config_changes(finished_run: tuple[Path, Path, str]) -> None:
    config, run_dir, _ = finished_run
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "ensemble.py"), "--config", str(config),
                           "--set", "ensemble.clip=0.01"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["clip"] == 0.01
    sub = pd.read_csv(run_dir / "submission.csv")[list(CLASS_NAMES)].to_numpy()
    assert sub.min() >= 0.01 - 1e-9 and sub.max() <= 0.99 + 1e-9


def test_predict_real_clips_and_a_broken_file(finished_run: tuple[Path, Path, str], real_videos_copy: Path,
                                              tmp_path: Path) -> None:
    _, run_dir, _ = finished_run
    (real_videos_copy / "broken.mp4").write_bytes(b"\x00" * 100)
    out = tmp_path / "pred.csv"
    proc = _cli("predict", "--run-dir", str(run_dir), "--videos", str(real_videos_copy), "--out", str(out),
                "--proba-threshold", "0.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pred = pd.read_csv(out)
    assert len(pred) == len(real_video_paths()) + 1
    assert list(pred.columns[:25]) == [FILENAME, *CLASS_NAMES]
    broken = pred[pred[FILENAME] == "broken.mp4"].iloc[0]
    assert broken["status"] == "error" and "broken.mp4" in broken["error"]
    assert pred.loc[pred[FILENAME] == "broken.mp4", list(CLASS_NAMES)].isna().all(axis=None)
    ok = pred[pred["status"] == "ok"]
    assert len(ok) == len(real_video_paths())
    assert ok[list(CLASS_NAMES)].notna().all(axis=None) and ok["top_label"].isin(CLASS_NAMES).all()


def test_bad_config_stops_before_any_work(tmp_path: Path) -> None:
    proc = _cli("run", "--config", str(REPO / "conf" / "demo.yaml"), "--set", "embed.n_frames=-2",
                "--set", f"run.root={tmp_path}")
    assert proc.returncode == 2
    assert "embed.n_frames" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_predict_reproduces_the_runs_test_predictions(finished_run: tuple[Path, Path, str], tiny_dataset: Path,
                                                      tmp_path: Path) -> None:
    _, run_dir, _ = finished_run
    fmt = pd.read_csv(tiny_dataset / "submission_format.csv")
    clips = tmp_path / "test clips"
    clips.mkdir()
    for name in fmt[FILENAME]:
        (clips / name).symlink_to(tiny_dataset / "videos" / name)
    out = tmp_path / "pred.csv"
    proc = _cli("predict", "--run-dir", str(run_dir), "--videos", str(clips), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pred = pd.read_csv(out).set_index(FILENAME)
    sub = pd.read_csv(run_dir / "submission.csv").set_index(FILENAME)
    np.testing.assert_allclose(pred.loc[sub.index, list(CLASS_NAMES)].to_numpy(), sub.to_numpy(), rtol=1e-4,
                               atol=1e-6)


def test_training_is_reproducible(finished_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    config, run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("oof", "test", "models", "predict"))
    proc = _cli("run", "--config", str(config), "--run-dir", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert "embed: already done for this config, skipped" in proc.stderr
    assert "train: starting" in proc.stderr
    for model in ("xgb", "head"):
        a = pd.read_parquet(run_dir / "oof" / f"{model}.parquet")
        b = pd.read_parquet(copy / "oof" / f"{model}.parquet")
        # XGBoost sums histograms over workers in an order that depends on data placement: equal to rounding
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)


def test_python_api_predicts_twice_in_one_process(finished_run: tuple[Path, Path, str], tiny_dataset: Path,
                                                  dask_client: object, tmp_path: Path) -> None:
    """The README's call, twice, after the submodule ``jungletrap.predict`` is imported (it used to shadow it)."""
    import jungletrap
    import jungletrap.predict  # noqa: F401  - what the first call imports anyway

    _, run_dir, _ = finished_run
    names = sorted(pd.read_csv(tiny_dataset / "submission_format.csv")[FILENAME])[:3]
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in names:
        (clips / name).symlink_to(tiny_dataset / "videos" / name)
    first = jungletrap.predict_videos(dask_client, run_dir, clips)
    second = jungletrap.predict_videos(dask_client, str(run_dir), str(clips))
    pd.testing.assert_frame_equal(first, second)
    sub = pd.read_csv(run_dir / "submission.csv").set_index(FILENAME)
    np.testing.assert_allclose(first.set_index(FILENAME).loc[names, list(CLASS_NAMES)].to_numpy(),
                               sub.loc[names].to_numpy(), rtol=1e-4, atol=1e-6)


def _predict_test_clips(run_dir: Path, tiny_dataset: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    fmt = pd.read_csv(tiny_dataset / "submission_format.csv")
    clips = tmp_path / "test clips"
    clips.mkdir(parents=True, exist_ok=True)
    for name in fmt[FILENAME]:
        if not (clips / name).exists():
            (clips / name).symlink_to(tiny_dataset / "videos" / name)
    return _cli("predict", "--run-dir", str(run_dir), "--videos", str(clips), "--out", str(tmp_path / "pred.csv"))


def test_predict_uses_what_the_models_were_trained_with_not_the_last_config(
    finished_run: tuple[Path, Path, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    """A later invocation with other embed settings (only the ensemble stage runs) changes nothing predict does."""
    config, run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("predict"))
    proc = _cli("ensemble", "--config", str(config), "--run-dir", str(copy), "--set", "embed.sample_fps=2",
                "--set", "ensemble.clip=0.001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _predict_test_clips(copy, tiny_dataset, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pred = pd.read_csv(tmp_path / "pred.csv").set_index(FILENAME)
    sub = pd.read_csv(copy / "submission.csv").set_index(FILENAME)
    np.testing.assert_allclose(pred.loc[sub.index, list(CLASS_NAMES)].to_numpy(), sub.to_numpy(), rtol=1e-4,
                               atol=1e-6)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert saved["embed"]["sample_fps"] == 1.0  # the embed stage did not run: its section is not rewritten
    assert saved["ensemble"]["clip"] == 0.001  # the ensemble stage ran: its section is


def test_predict_refuses_a_run_dir_whose_files_are_not_those_recorded(
    finished_run: tuple[Path, Path, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    config, run_dir, _ = finished_run
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited, ignore=shutil.ignore_patterns("predict"))
    transform = json.loads((edited / "models" / "features.json").read_text())
    transform["group_medians"] = {}
    (edited / "models" / "features.json").write_text(json.dumps(transform))
    proc = _predict_test_clips(edited, tiny_dataset, tmp_path / "a")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "models/features.json has changed since the features stage ran" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a" / "pred.csv").exists()

    # Embeddings made again with other settings after training: the models were trained on the old ones.
    reembedded = tmp_path / "reembedded"
    shutil.copytree(run_dir, reembedded, ignore=shutil.ignore_patterns("predict"))
    proc = _cli("embed", "--config", str(config), "--run-dir", str(reembedded), "--set", "embed.max_seconds=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _predict_test_clips(reembedded, tiny_dataset, tmp_path / "b")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the features stage's outputs were made from other embed outputs" in proc.stderr
