"""The whole pipeline with its data and its run directory in S3 (a moto server on 127.0.0.1), against the same
files in a local folder: same submission, every artifact in the bucket, no credential in any file or log.

The CLI runs as a subprocess, like a user's job: credentials reach it and its worker processes through the
environment (set in conftest); the config holds the endpoint (and, for the data, a key/secret pair that must
never be written anywhere).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from jungletrap.schema import CLASS_NAMES, FILENAME

from .conftest import REPO, S3Server, upload_tree, write_tiny_config

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "jungletrap")
BUCKET = "jt-pipeline"
DATA = f"s3://{BUCKET}/primatrix data"
RUNS = f"s3://{BUCKET}/runs"
FAKE_SECRET = "fake-secret-that-must-never-be-written"


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _s3_config(local: Path, server: S3Server, tmp: Path) -> Path:
    cfg = yaml.safe_load(local.read_text())
    cfg["run"].update({"root": RUNS, "storage_options": server.options})  # credentials: the environment
    cfg["data"] = {"videos": f"{DATA}/clips/{{variant}}", "labels": f"{DATA}/train_labels.csv",
                   "submission_format": f"{DATA}/submission_format.csv", "test_labels": f"{DATA}/test_labels.csv",
                   "storage_options": {**server.options, "key": "testing", "secret": FAKE_SECRET}}
    path = tmp / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def both_runs(tiny_dataset: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny set run from a local folder and from the bucket (clips under nested keys with spaces)."""
    tmp = tmp_path_factory.mktemp("s3_pipeline")
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    upload_tree(fs, tiny_dataset / "videos", f"{DATA}/clips/full")
    for name in ("train_labels.csv", "submission_format.csv", "test_labels.csv"):
        fs.pipe_file(f"{DATA}/{name}", (tiny_dataset / name).read_bytes())
    local_cfg = write_tiny_config(tmp / "local.yaml", tiny_dataset, run_root=tmp / "runs", name="tiny")
    local = _cli("run", "--config", str(local_cfg))
    assert local.returncode == 0, local.stdout + local.stderr
    before = s3_server.count()
    remote = _cli("run", "--config", str(_s3_config(local_cfg, s3_server, tmp)))
    assert remote.returncode == 0, remote.stdout + remote.stderr
    return {"tmp": tmp, "local_run": tmp / "runs" / "tiny", "s3_run": f"{RUNS}/tiny", "fs": fs,
            "s3_config": tmp / "s3.yaml", "proc": remote, "requests": s3_server.count() - before}


def _csv(fs: Any, url: str) -> pd.DataFrame:
    with fs.open(url, "rb") as handle:
        return pd.read_csv(handle)


def test_same_submission_from_a_local_folder_and_from_s3(both_runs: dict[str, Any]) -> None:
    fs, s3_run = both_runs["fs"], both_runs["s3_run"]
    local = pd.read_csv(both_runs["local_run"] / "submission.csv")
    remote = _csv(fs, f"{s3_run}/submission.csv")
    assert list(remote.columns) == [FILENAME, *CLASS_NAMES] and remote[FILENAME].tolist() == local[FILENAME].tolist()
    # the same clips give the same embeddings and models; xgboost.dask sums histograms over workers in an order
    # that depends on data placement, so the probabilities agree to rounding
    np.testing.assert_allclose(remote[list(CLASS_NAMES)].to_numpy(), local[list(CLASS_NAMES)].to_numpy(),
                               rtol=1e-4, atol=1e-6)
    manifest = json.loads(fs.cat_file(f"{s3_run}/manifest.json"))
    assert [manifest["stages"][s]["status"] for s in ("catalog", "embed", "features", "train", "ensemble")] == [
        "done"] * 5
    for out in ("catalog.parquet", "config.yaml", "metrics.json", "report.html", "models/ensemble.json",
                "models/features.json", "models/xgb/fold0.ubj", "models/head/fold1.pt", "perf/embed.html",
                "embeddings/tiny_cnn/part-00000.parquet", "features/part-00000.parquet", "oof/blend.parquet"):
        assert fs.isfile(f"{s3_run}/{out}"), out
    with fs.open(f"{s3_run}/catalog.parquet", "rb") as handle:
        catalog = pd.read_parquet(handle)
    assert catalog["path"].str.startswith(f"{DATA}/clips/full/").all() and (catalog["size_bytes"] > 0).all()
    assert not fs.glob(f"{s3_run}/**/.*tmp-*")  # uploads are atomic: no temporary objects


def test_no_credential_in_the_run_directory_or_the_logs(both_runs: dict[str, Any]) -> None:
    fs, s3_run, proc = both_runs["fs"], both_runs["s3_run"], both_runs["proc"]
    assert FAKE_SECRET not in proc.stdout + proc.stderr
    for key in fs.find(s3_run):
        assert FAKE_SECRET.encode() not in fs.cat_file(key), key
    saved = yaml.safe_load(fs.cat_file(f"{s3_run}/config.yaml"))
    assert saved["data"]["storage_options"] == {"endpoint_url": saved["run"]["storage_options"]["endpoint_url"]}


def test_rerun_on_s3_skips_every_stage(both_runs: dict[str, Any], s3_server: S3Server) -> None:
    proc = _cli("run", "--config", str(both_runs["s3_config"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("already done for this config, skipped") == 5


def test_predict_from_the_s3_run_reproduces_its_test_predictions(both_runs: dict[str, Any], tiny_dataset: Path,
                                                                 s3_server: S3Server) -> None:
    fs, s3_run = both_runs["fs"], both_runs["s3_run"]
    fmt = pd.read_csv(tiny_dataset / "submission_format.csv")
    for name in fmt[FILENAME]:
        fs.pipe_file(f"{DATA}/new clips/site 1/{name}", (tiny_dataset / "videos" / name).read_bytes())
    out = f"s3://{BUCKET}/predictions/pred.csv"
    proc = _cli("predict", "--run-dir", s3_run, "--videos", f"{DATA}/new clips", "--out", out,
                "--storage-options", json.dumps(s3_server.options))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pred = _csv(fs, out)
    pred[FILENAME] = pred[FILENAME].str.removeprefix("site 1/")
    sub = pd.read_csv(both_runs["local_run"] / "submission.csv").set_index(FILENAME)
    np.testing.assert_allclose(pred.set_index(FILENAME).loc[sub.index, list(CLASS_NAMES)].to_numpy(),
                               sub.to_numpy(), rtol=1e-4, atol=1e-6)
