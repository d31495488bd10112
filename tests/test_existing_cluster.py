"""Existing clusters: ``dask scheduler``/``dask worker`` processes reached by address, scheduler file and TLS.

The job must create no cluster of its own there (the CLI says ``existing cluster`` and the scheduler keeps its
two workers), write a performance report per stage it runs, and speak TLS with the config's certificates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from jungletrap.cluster import ClusterError, cluster_security
from jungletrap.config import STAGES, ClusterConfig, load_config
from jungletrap.pipeline import PERF_DIR, EmbedProgress, format_progress

from .conftest import REPO, DaskCLICluster, write_tiny_config

CLI = str(Path(sys.executable).parent / "jungletrap")


def _cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _statuses(run_dir: Path) -> dict[str, str]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {stage: rec["status"] for stage, rec in manifest["stages"].items()}


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and one certificate/key for 127.0.0.1 signed by it (scheduler, worker and client)."""
    tmp = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=jungletrap test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
             "-subj", "/CN=127.0.0.1", cwd=tmp)
    (tmp / "ext.cnf").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                 "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf", cwd=tmp)
    return {"ca": tmp / "ca.pem", "cert": tmp / "node.pem", "key": tmp / "node.key"}


def _tls_sets(tls: dict[str, Path]) -> list[str]:
    return ["--set", f"cluster.tls_ca_file={tls['ca']}", "--set", f"cluster.tls_cert_file={tls['cert']}",
            "--set", f"cluster.tls_key_file={tls['key']}"]


@pytest.fixture(scope="module")
def tiny_config(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("existing_cluster")
    return write_tiny_config(tmp / "tiny.yaml", tiny_dataset, run_root=tmp / "runs")


# ---- fast checks ----------------------------------------------------------------------------------------


def test_tls_config_needs_ca_and_cert() -> None:
    with pytest.raises(ValidationError, match="tls_ca_file and cluster.tls_cert_file"):
        ClusterConfig(tls_key_file="client.key")
    assert not ClusterConfig().uses_tls()
    assert ClusterConfig(tls_ca_file="ca.pem", tls_cert_file="both.pem").uses_tls()


def test_security_only_for_tls_addresses(tls_files: dict[str, Path]) -> None:
    cfg = ClusterConfig(tls_ca_file=str(tls_files["ca"]), tls_cert_file=str(tls_files["cert"]),
                        tls_key_file=str(tls_files["key"]))
    security = cluster_security(cfg, "tls://127.0.0.1:8786")
    assert security is not None and security.require_encryption
    assert security.tls_client_cert == str(tls_files["cert"]) and security.tls_ca_file == str(tls_files["ca"])
    assert cluster_security(ClusterConfig(), "tcp://127.0.0.1:8786") is None
    with pytest.raises(ClusterError, match="refusing to connect without encryption"):
        cluster_security(cfg, "tcp://127.0.0.1:8786")
    with pytest.raises(ClusterError, match="uses TLS: set cluster.tls_ca_file"):
        cluster_security(ClusterConfig(), "tls://127.0.0.1:8786")
    with pytest.raises(ClusterError, match="cluster.tls_key_file: .*missing.key does not exist"):
        cluster_security(cfg.model_copy(update={"tls_key_file": "/nonexistent/missing.key"}), "tls://h:1")


def test_progress_line_counts_rate_and_eta() -> None:
    assert format_progress(32, 120, 8.0) == "32/120 videos (27%), 4.00 videos/s, ETA 0:22"
    assert format_progress(0, 120, 0.0).endswith("ETA ?")
    assert format_progress(120, 120, 30.0).endswith("done")
    assert "ETA 2:46:40" in format_progress(1, 10001, 1.0)
    seen: list[int] = []
    progress = EmbedProgress(live=False, check=lambda: seen.append(1))
    progress(16, 32, 2.0)
    assert progress.last.startswith("16/32 videos (50%)") and seen == [1]


# ---- real clusters ----------------------------------------------------------------------------------------


def _assert_finished_on_existing_cluster(proc: subprocess.CompletedProcess[str], run_dir: Path,
                                         cluster: DaskCLICluster) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(existing cluster, 2 workers)" in proc.stdout, proc.stdout
    assert cluster.n_registered() == 2  # no workers added or lost: the job used the cluster as it was
    assert _statuses(run_dir) == dict.fromkeys(STAGES, "done")
    sub = pd.read_csv(run_dir / "submission.csv")
    fmt = pd.read_csv(load_config(run_dir / "config.yaml").data.submission_format)
    assert list(sub.columns) == list(fmt.columns) and sub["filename"].tolist() == fmt["filename"].tolist()
    assert sub.notna().all(axis=None)


@pytest.mark.slow
def test_pipeline_on_existing_cluster_by_address(dask_cli_cluster: DaskCLICluster, tiny_config: Path,
                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "by-address"
    proc = _cli("run", "--config", tiny_config, "--run-dir", run_dir, "--scheduler", dask_cli_cluster.address)
    _assert_finished_on_existing_cluster(proc, run_dir, dask_cli_cluster)
    assert "embed: 120/120 videos (100%)" in proc.stderr  # the progress line
    for stage in STAGES:  # a performance report per stage that ran
        html = (run_dir / PERF_DIR / f"{stage}.html").read_text()
        assert "Dask Performance Report" in html
    assert "embed_catalog_partition" in (run_dir / PERF_DIR / "embed.html").read_text()


@pytest.mark.slow
def test_pipeline_on_existing_cluster_by_scheduler_file(dask_cli_cluster: DaskCLICluster, tiny_config: Path,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "by-file"
    args = ["run", "--config", tiny_config, "--run-dir", run_dir, "--scheduler-file", dask_cli_cluster.scheduler_file]
    _assert_finished_on_existing_cluster(_cli(*args), run_dir, dask_cli_cluster)
    reports = {p.name: p.stat().st_mtime_ns for p in (run_dir / PERF_DIR).iterdir()}
    assert set(reports) == {f"{s}.html" for s in STAGES}
    again = _cli(*args)  # every stage is skipped: no stage ran, so no report is rewritten
    assert again.returncode == 0 and again.stderr.count("already done for this config, skipped") == len(STAGES)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / PERF_DIR).iterdir()} == reports


@pytest.mark.slow
def test_tls_keys_refuse_a_plain_tcp_scheduler(dask_cli_cluster: DaskCLICluster, tiny_config: Path,
                                               tls_files: dict[str, Path], tmp_path: Path) -> None:
    proc = _cli("catalog", "--config", tiny_config, "--run-dir", tmp_path / "r", "--scheduler",
                dask_cli_cluster.address, *_tls_sets(tls_files))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to connect without encryption" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_stages_over_tls(tiny_config: Path, tls_files: dict[str, Path], tmp_path: Path) -> None:
    cluster = DaskCLICluster(tmp_path / "tls-cluster", n_workers=1, tls=tls_files)
    cluster.workdir.mkdir()
    try:
        cluster.start()
        assert cluster.address.startswith("tls://127.0.0.1:")
        run_dir = tmp_path / "tls-run"
        no_keys = _cli("catalog", "--config", tiny_config, "--run-dir", run_dir, "--scheduler", cluster.address)
        assert no_keys.returncode == 2 and "uses TLS: set cluster.tls_ca_file" in no_keys.stderr, no_keys.stderr
        for stage in ("catalog", "embed"):
            proc = _cli(stage, "--config", tiny_config, "--run-dir", run_dir, "--scheduler", cluster.address,
                        *_tls_sets(tls_files))
            assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.logs()
            assert "(existing cluster, 1 workers)" in proc.stdout
        assert _statuses(run_dir) == {"catalog": "done", "embed": "done"}
        assert (run_dir / PERF_DIR / "embed.html").is_file()
    finally:
        cluster.close()
