"""Submit and detach: send the whole pipeline to a cluster as one task, follow it later, cancel it.

:func:`submit_run` sends one driver task (:func:`run_submitted`) with ``fire_and_forget``, so the run goes on
after the submitting process exits. The driver runs on a worker inside ``distributed.worker_client()``, which
secedes it from the worker's thread pool: the stages' own tasks then run on every worker (the driver's worker
included) without deadlocking even on single-threaded workers. If the driver's worker dies the scheduler
re-runs the driver elsewhere, and the pipeline resumes from the manifest like any re-run.

Cancellation (:func:`cancel_run`) releases the driver task on the scheduler; the worker marks it
``cancelled``, which the driver polls between stages and after each embed partition. The stage in progress
is then recorded as ``cancelled`` in the manifest, with an event. A task already running on a worker cannot
be interrupted by Dask, so a train or features stage finishes its current work before the run stops.

The driver's log lines (and those of the stages' tasks on the same worker) go to ``driver.log`` in the run
directory. Every worker must see the run directory and the data at the same paths (a shared filesystem), so
relative paths in the config are made absolute before submitting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client, Future, fire_and_forget

from jungletrap.config import STAGES, JobConfig
from jungletrap.manifest import MANIFEST_NAME, Manifest
from jungletrap.storage import RunPath, is_remote, run_path, write_bytes_atomic

__all__ = [
    "RUN_KEY_PREFIX",
    "DRIVER_LOG",
    "Submission",
    "run_key",
    "absolute_config",
    "submit_run",
    "run_submitted",
    "cancel_run",
    "format_status",
]

log = logging.getLogger(__name__)

RUN_KEY_PREFIX = "jungletrap-run-"
DRIVER_LOG = "driver.log"
_REGISTER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Submission:
    """What :func:`submit_run` sent: the driver task's key (the run id), the run directory, the dashboard."""

    run_id: str
    run_dir: RunPath
    dashboard_link: str | None
    scheduler_address: str


def run_key(run_name: str) -> str:
    """A unique, readable task key for a submitted run: ``jungletrap-run-<run name>-<short id>``."""
    return f"{RUN_KEY_PREFIX}{run_name}-{uuid.uuid4().hex[:8]}"


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


def absolute_config(cfg: JobConfig, base: Path) -> JobConfig:
    """A copy of ``cfg`` whose local data paths and run root are absolute (workers have their own cwd)."""
    data = cfg.data.model_copy(update={k: _absolute(getattr(cfg.data, k), base)
                                       for k in ("videos", "labels", "submission_format", "test_labels")})
    run = cfg.run.model_copy(update={"root": _absolute(cfg.run.root, base)})
    return cfg.model_copy(update={"data": data, "run": run})


def _wait_registered(client: Client, key: str, timeout_s: float) -> str:
    """Wait until the scheduler knows ``key`` (so closing the client cannot lose it); return its state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.sync(client.scheduler.get_task_status, keys=[key]).get(key)
        if state is not None or time.monotonic() > deadline:
            return str(state)
        time.sleep(0.05)


def submit_run(client: Client, cfg: JobConfig, run_dir: RunPath, *, stages: list[str] | None = None,
               force: bool = False) -> Submission:
    """Send the pipeline to the cluster as one fire-and-forget task; return at once.

    ``cfg`` should already have absolute paths (:func:`absolute_config`); ``run_dir`` is made absolute.
    """
    run_dir = run_path(run_dir, cfg.run.storage_options)
    if not is_remote(run_dir):
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    key = run_key(cfg.run.name)
    Manifest(run_dir).record_event(f"submitted as {key} to {client.scheduler.address}")
    future = client.submit(run_submitted, cfg.model_dump(mode="json"), str(run_dir), list(stages or STAGES),
                           force, key=key, pure=False)
    fire_and_forget(future)
    state = _wait_registered(client, key, _REGISTER_TIMEOUT_S)
    log.info("submitted %s (%s on the scheduler)", key, state)
    return Submission(run_id=key, run_dir=run_dir, dashboard_link=client.dashboard_link,
                      scheduler_address=client.scheduler.address)


@contextlib.contextmanager
def _driver_log(run_dir: RunPath) -> Iterator[None]:
    """Copy jungletrap's INFO log lines to ``driver.log`` while the driver runs (restored afterwards).

    On an object store the lines go to a local temporary file, uploaded when the driver ends.
    """
    remote = is_remote(run_dir)
    with tempfile.TemporaryDirectory(prefix="jungletrap-driver-") as tmp:
        local = Path(tmp) / DRIVER_LOG if remote else run_dir / DRIVER_LOG
        try:
            with _log_to(local):
                yield
        finally:
            if remote:
                write_bytes_atomic(local.read_bytes(), run_dir / DRIVER_LOG)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    logger = logging.getLogger("jungletrap")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run_submitted(cfg_data: dict[str, Any], run_dir: str, stages: list[str], force: bool) -> dict[str, Any]:
    """The driver task of a submitted run; runs on a worker. Returns the stages' counts."""
    from distributed import get_worker, worker_client

    from jungletrap.cluster import describe_client
    from jungletrap.pipeline import StageContext, run_pipeline

    worker = get_worker()
    key = worker.get_current_task()
    cfg = JobConfig.model_validate(cfg_data)
    path = run_path(run_dir, cfg.run.storage_options)

    def cancelled() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    Manifest(path).record_event(f"{key} started on worker {worker.address}")
    with _driver_log(path), worker_client() as client:
        info = describe_client(client, "existing")
        try:
            results = run_pipeline(StageContext(client, cfg, path, info, cancelled=cancelled), stages=stages,
                                   force=force)
        except CancelledError:
            Manifest(path).record_event(f"{key} stopped: cancelled")
            raise
        except Exception as err:
            Manifest(path).record_event(f"{key} failed: {type(err).__name__}: {err}")
            raise
    late = " (a cancel request came after the last stage had started)" if cancelled() else ""
    Manifest(path).record_event(f"{key} finished{late}")
    return results


def cancel_run(client: Client, run_id: str) -> str | None:
    """Cancel a submitted run's driver task; return its state before (None: the scheduler does not know it)."""
    state = client.sync(client.scheduler.get_task_status, keys=[run_id]).get(run_id)
    if state is None:
        return None
    client.cancel([Future(run_id, client)], force=True, msg="cancelled by jungletrap cancel")
    return str(state)


def _clock(seconds: float | None) -> str:
    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def format_status(run_dir: RunPath) -> str:
    """A run's state from its manifest: per stage status, seconds, failures and counts, then the events."""
    manifest = Manifest(run_dir)
    lines = [f"run: {run_dir}" + ("" if (run_dir / MANIFEST_NAME).is_file() else " (no manifest yet)")]
    lines.append(f"{'stage':<10} {'status':<12} {'seconds':>8} {'failed':>6}  counts")
    for stage in STAGES:
        rec = manifest.stage(stage)
        if rec is None:
            lines.append(f"{stage:<10} {'pending':<12} {'-':>8} {'-':>6}")
            continue
        seconds = f"{rec.seconds:.1f}" if rec.seconds is not None else f"({time.time() - rec.started:.0f})"
        failed = rec.counts.get("failed", 0)
        lines.append(f"{stage:<10} {rec.status:<12} {seconds:>8} {failed:>6}  {_counts(rec.counts)}")
        if rec.error:
            lines.append(f"{'':<10} error: {rec.error}")
    events = manifest.data.get("events", [])
    if events:
        lines.append("events:")
        lines.extend(f"  {_clock(e.get('time'))}  {e.get('event')}" for e in events)
    if (run_dir / DRIVER_LOG).is_file():
        lines.append(f"driver log: {run_dir / DRIVER_LOG}")
    return "\n".join(lines)
