"""Cluster selection: local process clusters, existing schedulers, and a clear error for CUDA without GPUs."""

from __future__ import annotations

import base64
import http.client
import os
from urllib.parse import urlparse

import pytest
from distributed import Client

from jungletrap.cluster import ClusterError, cuda_available, open_client
from jungletrap.config import ClusterConfig


def _imports_udfs() -> tuple[int, str]:
    import jungletrap.udfs.embed as embed_udf

    return os.getpid(), embed_udf.__name__


def test_workers_are_processes_that_import_the_udfs(dask_client: Client) -> None:
    results = dask_client.run(_imports_udfs)
    pids = {pid for pid, _ in results.values()}
    assert len(results) == 2 and os.getpid() not in pids and len(pids) == 2
    assert {name for _, name in results.values()} == {"jungletrap.udfs.embed"}


def _websocket_handshake(dashboard_link: str, origin: str) -> int:
    """HTTP status of a websocket upgrade to the dashboard sent as a browser page from ``origin`` would."""
    url = urlparse(dashboard_link)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", "/status/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Origin": origin})
        return conn.getresponse().status
    finally:
        conn.close()


def test_local_cpu_cluster_binds_loopback_and_prints_dashboard() -> None:
    cfg = ClusterConfig(kind="cpu", n_workers=1, threads_per_worker=1)
    with open_client(cfg) as (client, info):
        assert info.kind == "cpu" and info.n_workers == 1 and not info.gpu
        assert info.dashboard_link is not None and "127.0.0.1" in info.dashboard_link
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert client.submit(sum, [1, 2, 3]).result() == 6
        # a loopback dashboard refuses websockets opened by pages from other origins (Dask allows any)
        port = urlparse(info.dashboard_link).port
        assert _websocket_handshake(info.dashboard_link, "http://evil.example") == 403
        assert _websocket_handshake(info.dashboard_link, f"http://localhost:{port}") == 101


def test_existing_scheduler_creates_no_cluster(dask_client: Client) -> None:
    address = dask_client.scheduler.address
    with open_client(ClusterConfig(kind="cpu"), address=address) as (client, info):
        assert info.kind == "existing" and info.n_workers == 2
        assert client.scheduler.address == address
    assert dask_client.submit(sum, [1, 1]).result() == 2  # closing our client left the cluster alone


def test_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with open_client(ClusterConfig(connect_timeout_s=2), address="tcp://127.0.0.1:9"):
            pass


@pytest.mark.skipif(cuda_available(), reason="this checks the message on machines without a GPU")
def test_cuda_cluster_without_gpu_says_why() -> None:
    with pytest.raises(ClusterError, match="cluster.kind=cuda"):
        with open_client(ClusterConfig(kind="cuda")):
            pass


@pytest.mark.skipif(cuda_available(), reason="auto picks CUDA where a GPU is visible")
def test_auto_falls_back_to_cpu_without_gpu() -> None:
    with open_client(ClusterConfig(kind="auto", n_workers=1)) as (_, info):
        assert info.kind == "cpu"
