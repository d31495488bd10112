"""Submit and detach: the run goes on on the cluster after ``jungletrap submit`` exits; status; cancel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jungletrap.cli import app
from jungletrap.config import STAGES
from jungletrap.manifest import Manifest
from jungletrap.schema import CLASS_NAMES, FILENAME
from jungletrap.submit import absolute_config, format_status, run_key

from .conftest import REPO, DaskCLICluster, write_tiny_config

CLI = str(Path(sys.executable).parent / "jungletrap")


def _cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _statuses(run_dir: Path) -> dict[str, str]:
    """Each stage's status as ``jungletrap status`` prints it."""
    proc = _cli("status", "--run-dir", run_dir, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    return {line.split()[0]: line.split()[1] for line in lines if line.split()[:1] and line.split()[0] in STAGES}


def _manifest_statuses(run_dir: Path) -> dict[str, str]:
    """Each stage's status read straight from manifest.json (cheap enough to poll)."""
    stages = json.loads((run_dir / "manifest.json").read_text()).get("stages", {})
    return {stage: stages.get(stage, {}).get("status", "pending") for stage in STAGES}


def _submit(config: Path, run_dir: Path, cluster: DaskCLICluster, *sets: str) -> str:
    proc = _cli("submit", "--config", config, "--run-dir", run_dir, "--scheduler", cluster.address, *sets,
                timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert Path(fields["run dir"].strip()) == run_dir.resolve()
    assert fields["dashboard"].strip().startswith("http://127.0.0.1:")
    return fields["run id"].strip()


@pytest.fixture(scope="module")
def tiny_config(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("submit")
    return write_tiny_config(tmp / "tiny.yaml", tiny_dataset, run_root=tmp / "runs")


# ---- fast checks ----------------------------------------------------------------------------------------


def test_run_key_and_absolute_paths(tmp_path: Path) -> None:
    from jungletrap.config import load_config

    key = run_key("demo")
    assert key.startswith("jungletrap-run-demo-") and len(key.rsplit("-", 1)[1]) == 8 and run_key("demo") != key
    cfg = absolute_config(load_config(REPO / "conf" / "demo.yaml", ["data.test_labels=s3://bucket/t.csv"]), tmp_path)
    assert cfg.data.videos == str(tmp_path / "data/demo/videos") and cfg.run.root == str(tmp_path / "runs")
    assert cfg.data.test_labels == "s3://bucket/t.csv"


def test_status_prints_stages_failures_and_events(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.record_event("submitted as jungletrap-run-x-0000abcd to tcp://127.0.0.1:1")
    manifest.start("catalog", "h1")
    manifest.finish("catalog", status="done", counts={"train": 9, "test": 3})
    manifest.start("embed", "h2")
    manifest.finish("embed", status="cancelled", counts={"failed": 2}, error="RunCancelled: run cancelled")
    text = format_status(tmp_path)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:7]}
    assert rows["catalog"][0] == "done" and "train=9" in text
    assert rows["embed"][0] == "cancelled" and rows["embed"][2] == "2" and "error: RunCancelled" in text
    assert rows["features"][0] == "pending" and "submitted as jungletrap-run-x-0000abcd" in text
    result = CliRunner().invoke(app, ["status", "--run-dir", str(tmp_path)])
    assert result.exit_code == 0 and "cancelled" in result.output
    assert CliRunner().invoke(app, ["status", "--run-dir", str(tmp_path / "nope")]).exit_code == 2


def test_submit_needs_a_cluster_and_a_valid_config(tmp_path: Path) -> None:
    runner = CliRunner()
    no_cluster = runner.invoke(app, ["submit", "--config", str(REPO / "conf" / "demo.yaml")])
    assert no_cluster.exit_code == 2 and "submit needs an existing cluster" in no_cluster.output
    bad = runner.invoke(app, ["submit", "--config", str(REPO / "conf" / "demo.yaml"), "--set", "embed.nope=1",
                              "--scheduler", "tcp://127.0.0.1:9"])
    assert bad.exit_code == 2 and "embed.nope: unknown key" in bad.output
    unreachable = runner.invoke(app, ["submit", "--config", str(REPO / "conf" / "demo.yaml"), "--run-dir",
                                      str(tmp_path / "r"), "--set", "cluster.connect_timeout_s=2",
                                      "--scheduler", "tcp://127.0.0.1:9"])
    assert unreachable.exit_code == 2 and "cannot reach the Dask scheduler" in unreachable.output
    no_cluster = runner.invoke(app, ["cancel", "--run-id", "jungletrap-run-x-00000000"])
    assert no_cluster.exit_code == 2 and "cancel needs the cluster" in no_cluster.output


# ---- real cluster ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitted_run_finishes_detached_like_a_normal_run(dask_cli_cluster: DaskCLICluster, tiny_config: Path,
                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "submitted"
    run_id = _submit(tiny_config, run_dir, dask_cli_cluster)
    assert run_id.startswith("jungletrap-run-tiny-")
    assert _statuses(run_dir).get("ensemble") != "done"  # submit returned while the run goes on
    deadline = time.monotonic() + 300
    while (statuses := _manifest_statuses(run_dir)) != dict.fromkeys(STAGES, "done"):
        assert not {"failed", "cancelled"} & set(statuses.values()), _cli("status", "--run-dir", run_dir).stdout
        assert time.monotonic() < deadline, f"submitted run not done: {statuses}"
        time.sleep(1)
    assert _statuses(run_dir) == dict.fromkeys(STAGES, "done")
    events = [e["event"] for e in json.loads((run_dir / "manifest.json").read_text())["events"]]
    assert events[0].startswith(f"submitted as {run_id}") and events[-1] == f"{run_id} finished"
    assert "embed: 120/120 videos (100%)" in (run_dir / "driver.log").read_text()
    assert {p.name for p in (run_dir / "perf").iterdir()} == {f"{s}.html" for s in STAGES}
    assert dask_cli_cluster.n_registered() == 2

    normal = tmp_path / "normal"
    proc = _cli("run", "--config", tiny_config, "--run-dir", normal, "--scheduler", dask_cli_cluster.address)
    assert proc.returncode == 0, proc.stderr
    a = pd.read_csv(run_dir / "submission.csv").set_index(FILENAME)
    b = pd.read_csv(normal / "submission.csv").set_index(FILENAME)
    assert list(a.index) == list(b.index) and list(a.columns) == list(CLASS_NAMES)
    # xgboost.dask sums histograms over workers in an order that depends on data placement: equal to rounding
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cancel_stops_a_submitted_run(dask_cli_cluster: DaskCLICluster, tiny_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cancelled"
    # many small partitions (a cancellation check after each) and its own embed settings (its own task keys)
    run_id = _submit(tiny_config, run_dir, dask_cli_cluster, "--set", "catalog.videos_per_partition=2",
                     "--set", "embed.sample_fps=2")
    deadline = time.monotonic() + 120
    while _manifest_statuses(run_dir)["embed"] == "pending":  # cancel while the driver is at work
        assert time.monotonic() < deadline, _cli("status", "--run-dir", run_dir).stdout
        time.sleep(0.5)
    proc = _cli("cancel", "--scheduler", dask_cli_cluster.address, "--run-id", run_id, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cancelled {run_id} (it was processing)" in proc.stdout
    while "running" in (statuses := _manifest_statuses(run_dir)).values():  # the driver stops at its next check
        assert time.monotonic() < deadline + 120, statuses
        time.sleep(0.5)
    events = [e["event"] for e in json.loads((run_dir / "manifest.json").read_text())["events"]]
    assert events[-1] == f"{run_id} stopped: cancelled", events
    statuses = _statuses(run_dir)
    assert statuses["ensemble"] == "pending" and "running" not in statuses.values()
    assert "cancelled" in statuses.values() or any(e.startswith("run cancelled before") for e in events)
    again = _cli("cancel", "--scheduler", dask_cli_cluster.address, "--run-id", run_id, timeout=120)
    assert again.returncode == 1 and "has no task" in again.stderr
    assert dask_cli_cluster.n_registered() == 2
