"""The one place that decides which Dask cluster a job runs on.

Library functions take a :class:`distributed.Client`; only jobs and the CLI call :func:`open_client`.
``auto`` picks dask-cuda's ``LocalCUDACluster`` (one worker per GPU) when torch sees a GPU and dask-cuda is
installed, a plain process-based ``LocalCluster`` otherwise; an address or scheduler file connects to an
existing cluster (``dask scheduler``/``dask worker``, dask-jobqueue, Kubernetes) and creates nothing. A ``tls://``
scheduler is reached with the config's certificates handed to :class:`distributed.security.Security`
(encryption required).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from distributed import Client, LocalCluster

from jungletrap.config import ClusterConfig
from jungletrap.decoding import allow_worker_subprocesses

__all__ = [
    "ClusterError",
    "ClusterInfo",
    "open_client",
    "cluster_security",
    "describe_client",
    "scheduler_address",
    "cuda_available",
    "cluster_has_gpu",
    "gpu_resources",
    "worker_nthreads",
    "relax_malloc_trim",
    "StageMemoryError",
    "WORKER_MEMORY",
    "explain_lost_workers",
    "worker_memory_limits",
]

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The requested cluster cannot be created or reached; the message says why and what to do."""


class StageMemoryError(RuntimeError):
    """A stage's task kept killing its workers (most likely out of memory); the message names the stage and limit."""


#: Worker memory thresholds of the clusters jungletrap starts, as fractions of ``cluster.memory_limit`` (Dask's
#: defaults, stated here because the job relies on them): above ``target``/``spill`` a worker writes task results
#: to its local disk, above ``pause`` it starts no new task, and above ``terminate`` its nanny kills and restarts
#: it. A task that needs more than a worker has therefore ends in ``terminate``, not in swap; after Dask's
#: ``distributed.scheduler.allowed-failures`` kills (3) it gives up on the task (``KilledWorker``), which
#: :func:`explain_lost_workers` turns into a :class:`StageMemoryError` naming the stage and the limit.
WORKER_MEMORY: dict[str, float] = {
    "distributed.worker.memory.target": 0.6,
    "distributed.worker.memory.spill": 0.7,
    "distributed.worker.memory.pause": 0.8,
    "distributed.worker.memory.terminate": 0.95,
}


def worker_memory_limits(client: Client) -> dict[str, int]:
    """Each worker's memory limit in bytes (0: none), from the scheduler."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return {addr: int(w.get("memory_limit") or 0) for addr, w in workers.items()}


def _format_bytes(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n) if n else "no limit"


def _lost_workers_message(stage: str, err: Exception, limits: dict[str, int]) -> str:
    task, tries = getattr(err, "task", "?"), getattr(err, "allowed_failures", 0) + 1
    limit = ", ".join(sorted({_format_bytes(v) for v in limits.values()})) or "unknown (no worker connected)"
    return (f"{stage}: task {task!r} killed its worker {tries} times, most likely by running out of memory "
            f"(worker memory limit: {limit}; a worker's nanny restarts it above 95 % of the limit). The stage "
            "needs more memory per task than a worker has: raise cluster.memory_limit (or run fewer workers per "
            "machine), or make tasks smaller (catalog.videos_per_partition, batch sizes); the worker logs say more.")


@contextlib.contextmanager
def explain_lost_workers(client: Client, stage: str) -> Iterator[None]:
    """Turn Dask's ``KilledWorker`` (a task whose workers kept dying) into a :class:`StageMemoryError`."""
    from distributed.scheduler import KilledWorker

    limits = _limits_or_none(client)  # now: when the task fails its worker may be restarting, not connected
    try:
        yield
    except KilledWorker as err:
        raise StageMemoryError(_lost_workers_message(stage, err, _limits_or_none(client) or limits)) from err


def _limits_or_none(client: Client) -> dict[str, int]:
    try:
        return worker_memory_limits(client)
    except Exception:  # the message must not fail for want of a scheduler answer
        return {}


@dataclass(frozen=True)
class ClusterInfo:
    """What kind of cluster the client is connected to, for logs and the manifest."""

    kind: str
    dashboard_link: str | None
    n_workers: int
    gpu: bool
    scheduler_address: str | None = None


def cuda_available() -> bool:
    """True when torch sees a CUDA device on this machine."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def _local_cuda_cluster(cfg: ClusterConfig) -> LocalCluster:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise ClusterError(
            "cluster.kind=cuda needs dask-cuda: pip install 'jungletrap[gpu]' " f"({err})"
        ) from None
    try:
        return LocalCUDACluster(
            threads_per_worker=cfg.threads_per_worker,
            ip=cfg.host,
            dashboard_address=cfg.dashboard_address,
            memory_limit=cfg.memory_limit,
            resources={"GPU": 1},
        )
    except Exception as err:  # NVMLError_LibraryNotFound and friends have no common base class
        raise ClusterError(
            f"cluster.kind=cuda: dask-cuda could not start a LocalCUDACluster ({type(err).__name__}: {err}). "
            "No NVIDIA driver/GPU is visible here; use cluster.kind=cpu or auto."
        ) from None


_ORIGIN_KEY = "distributed.scheduler.dashboard.bokeh-application.allow_websocket_origin"
_LOOPBACK = ("127.0.0.1", "localhost")


@contextlib.contextmanager
def _dashboard_origins(cfg: ClusterConfig) -> Iterator[ClusterConfig]:
    """Dask lets any web page's scripts open the dashboard's websockets (``allow_websocket_origin: ["*"]``).

    A dashboard on loopback is only for pages served by itself, so other origins are refused: a malicious page
    in the user's browser could otherwise drive it. Bokeh's allow-list needs the port, so a port of 0 is chosen
    here. A dashboard on another interface keeps Dask's setting: the user chose to expose it (set the key above
    in Dask's config to restrict it). Yields the config with the dashboard address to use.
    """
    host, _, port = cfg.dashboard_address.rpartition(":")
    if host not in _LOOPBACK or not port.isdigit():
        yield cfg
        return
    import socket

    import dask

    if port == "0":
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = str(probe.getsockname()[1])
    with dask.config.set({_ORIGIN_KEY: [f"{name}:{port}" for name in _LOOPBACK]}):
        yield cfg.model_copy(update={"dashboard_address": f"{host}:{port}"})


def _local_cpu_cluster(cfg: ClusterConfig) -> LocalCluster:
    return LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        host=cfg.host,
        dashboard_address=cfg.dashboard_address,
        memory_limit=cfg.memory_limit,
    )


def scheduler_address(address: str | None, scheduler_file: str | None) -> str | None:
    """The scheduler's address: ``address`` itself, else the one a scheduler file records (None: unreadable)."""
    if address or not scheduler_file:
        return address
    try:
        with open(scheduler_file, encoding="utf-8") as fh:
            return str(json.load(fh)["address"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cluster_security(cfg: ClusterConfig, address: str | None) -> object | None:
    """A ``Security`` with the config's certificates for a ``tls://`` scheduler; None for plain TCP.

    With certificates configured, a scheduler address that is not ``tls://`` is refused rather than used
    unencrypted. Without them, Dask's own configuration (``distributed.comm.tls.*``) applies.
    """
    if not cfg.uses_tls():
        if address is not None and address.startswith("tls://") and not _dask_tls_configured():
            raise ClusterError(f"the scheduler {address} uses TLS: set cluster.tls_ca_file, cluster.tls_cert_file "
                               "and cluster.tls_key_file (e.g. --set cluster.tls_ca_file=ca.pem)")
        return None
    if address is not None and not address.startswith("tls://"):
        raise ClusterError(f"cluster.tls_* are set but the scheduler address {address} is not tls://; "
                           "refusing to connect without encryption (use the scheduler's tls:// address)")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(cfg, key)
        if path is not None and not os.path.isfile(path):
            raise ClusterError(f"cluster.{key}: {path} does not exist")
    from distributed.security import Security

    return Security(tls_ca_file=cfg.tls_ca_file, tls_client_cert=cfg.tls_cert_file,
                    tls_client_key=cfg.tls_key_file, require_encryption=True)


def _dask_tls_configured() -> bool:
    """True when Dask's own config (``distributed.comm.tls.*``) names client certificates."""
    import dask

    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                and dask.config.get("distributed.comm.tls.client.cert", None))


def _connect(address: str | None, scheduler_file: str | None, security: object | None, timeout_s: float) -> Client:
    try:
        if scheduler_file:
            return Client(scheduler_file=scheduler_file, security=security, timeout=timeout_s)
        return Client(address, security=security, timeout=timeout_s)
    except OSError as err:
        target = scheduler_file or address
        raise ClusterError(f"cannot reach the Dask scheduler at {target}: {err}") from None


@contextlib.contextmanager
def open_client(
    cfg: ClusterConfig,
    *,
    address: str | None = None,
    scheduler_file: str | None = None,
    security: object | None = None,
) -> Iterator[tuple[Client, ClusterInfo]]:
    """Yield a client for the configured cluster and close what this call created.

    ``address``/``scheduler_file`` (from the command line) win over the config's own. ``security`` defaults
    to :func:`cluster_security` of the config (TLS certificates for a ``tls://`` scheduler).
    """
    address = address or cfg.address
    scheduler_file = scheduler_file or cfg.scheduler_file
    cluster: LocalCluster | None = None
    if address or scheduler_file:
        if security is None:
            security = cluster_security(cfg, scheduler_address(address, scheduler_file))
        client, kind = _connect(address, scheduler_file, security, cfg.connect_timeout_s), "existing"
    else:
        kind = cfg.kind
        if kind == "address":  # validated: cannot happen without an address
            raise ClusterError("cluster.kind=address needs cluster.address or --scheduler")
        if kind == "auto":
            kind = "cuda" if cuda_available() and _has_dask_cuda() else "cpu"
            log.info("cluster.kind=auto chose %s", kind)
        allow_worker_subprocesses()  # embed workers run decoder processes (jungletrap.decoding)
        import dask

        dask.config.set(WORKER_MEMORY)  # the nanny hands the workers this process's config
        with _dashboard_origins(cfg) as local_cfg:
            cluster = _local_cuda_cluster(local_cfg) if kind == "cuda" else _local_cpu_cluster(local_cfg)
        client = Client(cluster)
    try:
        info = describe_client(client, kind)
        yield client, info
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _has_dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def cluster_has_gpu(client: Client) -> bool:
    """True when some worker advertises a ``GPU`` resource (dask-cuda workers started by us or by hand)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())


def gpu_resources(gpu: bool) -> dict[str, float] | None:
    """Task resources that pin GPU work to GPU workers (one GPU task per worker at a time)."""
    return {"GPU": 1} if gpu else None


def describe_client(client: Client, kind: str) -> ClusterInfo:
    """What ``client`` is connected to (``kind``: ``cpu``, ``cuda`` or ``existing``)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return ClusterInfo(kind=kind, dashboard_link=client.dashboard_link, n_workers=len(workers),
                       gpu=cluster_has_gpu(client), scheduler_address=client.scheduler.address)


def worker_nthreads(default: int = 1) -> int:
    """Threads of the Dask worker running the current task (the budget for torch threads)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ValueError, AttributeError):
        return default


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`relax_malloc_trim` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's own dynamic ceiling on 64-bit
_TRIM_THRESHOLD_BYTES = 2 * _MMAP_THRESHOLD_BYTES  # what glibc's dynamic rule pairs with it
_malloc_relaxed = False


def relax_malloc_trim() -> bool:
    """Give a torch worker glibc's large-allocation behaviour back; True when applied (once per process).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory returns to the OS.
    Setting it also freezes glibc's mmap threshold at 128 KiB, so every activation tensor of a CNN batch is a
    fresh ``mmap`` whose pages fault in again: the embed UDF measured ~25 % slower on CPU (bench/embed.py). This
    sets the thresholds glibc's dynamic rule reaches on its own (mmap above 32 MiB, trim above 64 MiB); memory
    still returns to the OS, in larger steps. A no-op off glibc.
    """
    global _malloc_relaxed
    if _malloc_relaxed:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    _malloc_relaxed = True
    log.debug("malloc thresholds for torch: mmap %d B, trim %d B (%s)", _MMAP_THRESHOLD_BYTES,
              _TRIM_THRESHOLD_BYTES, "set" if ok else "mallopt refused")
    return ok
