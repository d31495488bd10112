"""Decoder processes (jungletrap.decoding): same frames as decoding in place, order kept, and a decoder that
hangs or dies costs only its own clip. Everything is real: spawned processes, real clips, an S3 endpoint that never
answers (a hang inside a network read, where no cooperative timeout can fire), SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from jungletrap.config import EmbedConfig
from jungletrap.decoding import (
    DecodeJob,
    _decoder_processes,
    allow_worker_subprocesses,
    can_spawn_processes,
    decode,
    decode_in_order,
    decoder_pids,
    decoder_processes_for,
)
from jungletrap.embed import embed_settings

from .conftest import real_video_paths


def _job(path: Path | str, timeout_s: float = 30.0) -> DecodeJob:
    return DecodeJob(source=str(path), sample_fps=3.0, max_seconds=15.0, n_frames=None, size=64,
                     timeout_s=timeout_s)


@pytest.fixture()
def silent_endpoint() -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers: reading a clip from it hangs in the network
    (botocore waits 60 s a try, and retries), where no cooperative decode timeout can fire."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def _stuck_job(endpoint: str, timeout_s: float = 30.0) -> DecodeJob:
    return DecodeJob(source="s3://clips/stuck clip.mp4", sample_fps=3.0, max_seconds=15.0, n_frames=None, size=64,
                     timeout_s=timeout_s, storage_options={"endpoint_url": endpoint})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it has exited
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_processes_give_the_same_frames_in_order_with_error_rows(tmp_path: Path) -> None:
    broken = tmp_path / "broken clip.avi"
    broken.write_bytes(b"this is not a video")
    paths = [*real_video_paths(), broken, tmp_path / "gone.mp4"]
    jobs = [_job(p) for p in paths]
    out = list(decode_in_order(jobs, processes=2, threads=1, ahead=3))
    assert [pos for pos, _, _ in out] == list(range(len(paths)))
    for (_, clip, error), path in zip(out[:-2], paths, strict=False):
        assert error is None, error
        reference = decode(_job(path))  # this process
        assert np.array_equal(clip.frames, reference.frames), path
        assert clip.info == reference.info and clip.pixel_stats == pytest.approx(reference.pixel_stats, nan_ok=True)
    for (_, clip, error), path in zip(out[-2:], paths[-2:], strict=True):
        assert clip is None and error is not None and str(path) in error
    for pid in decoder_pids(2):  # decoders import no torch (~300 MB each): pytest's main module is light
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("processes", [0, 1])
def test_a_bug_in_decoding_fails_loudly_instead_of_becoming_an_error_row(processes: int) -> None:
    """Only bad input becomes an error row: a TypeError from our own code (here a size given as text) must
    surface, or a bug would quietly turn every clip of a run into an error row."""
    good = real_video_paths()[0]
    buggy = DecodeJob(source=str(good), sample_fps=3.0, max_seconds=15.0, n_frames=None, size="64",  # type: ignore[arg-type]
                      timeout_s=30.0)
    with pytest.raises(TypeError):
        list(decode_in_order([_job(good), buggy], processes=processes, threads=1, ahead=2))


def test_a_decoder_stuck_in_a_read_is_killed_and_the_next_clips_decode(silent_endpoint: str) -> None:
    good = real_video_paths()[0]
    jobs = [_stuck_job(silent_endpoint, timeout_s=0.5), _job(good)]
    start = time.perf_counter()
    out = list(decode_in_order(jobs, processes=1, threads=1, ahead=2))
    elapsed = time.perf_counter() - start
    assert out[0][1] is None and "did not finish within 6 s" in out[0][2] and "stuck clip.mp4" in out[0][2]
    assert out[1][2] is None and np.array_equal(out[1][1].frames, decode(_job(good)).frames)
    assert elapsed < 30, elapsed


def test_a_clip_whose_decoder_dies_twice_is_an_error_row_and_the_others_are_retried(silent_endpoint: str) -> None:
    """Decoder processes are SIGKILLed twice while the first clip is in flight (as the OOM killer or a crash in
    FFmpeg would): the clip retried alone dies again and becomes an error row; the clips queued behind it are
    resubmitted to a new pool and come out whole."""
    good = real_video_paths()[:2]
    jobs = [_stuck_job(silent_endpoint, timeout_s=5.0), *(_job(p) for p in good)]
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while len(killed) < 2 and time.monotonic() < deadline:
            pids = [p for p in decoder_pids(1) if p not in killed]
            if pids:
                time.sleep(1.0)  # let it pick up the stuck clip
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    out = list(decode_in_order(jobs, processes=1, threads=1, ahead=3))
    thread.join()
    assert len(killed) == 2
    assert out[0][1] is None and "crashed on this clip (twice)" in out[0][2] and "stuck clip.mp4" in out[0][2]
    for (_, clip, error), path in zip(out[1:], good, strict=True):
        assert error is None and np.array_equal(clip.frames, decode(_job(path)).frames)


_ORPHAN_SCRIPT = """
import sys, time
from jungletrap.decoding import DecodeJob, decode_in_order, decoder_pids
if __name__ == "__main__":  # decoder processes are spawned: they import the main module
    job = DecodeJob(source=sys.argv[1], sample_fps=1.0, max_seconds=2.0, n_frames=None, size=32, timeout_s=30.0)
    assert all(e is None for _, _, e in decode_in_order([job, job], processes=2, threads=1, ahead=2))
    print(*decoder_pids(), flush=True)
    time.sleep(600)
"""


def test_decoder_processes_exit_when_their_worker_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(real_video_paths()[0])], stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "decoder processes outlived their SIGKILLed parent"


def test_decoder_process_count_by_device() -> None:
    assert decoder_processes_for(3, device="cuda", torch_threads=8) == 3
    assert decoder_processes_for(0, device="cpu", torch_threads=8) == 0
    assert decoder_processes_for(None, device="cpu", torch_threads=1) == 1
    assert decoder_processes_for(None, device="cpu", torch_threads=8) == 2
    assert decoder_processes_for(None, device="cpu", torch_threads=8, threads_per_decoder=2) == 4
    cores = len(os.sched_getaffinity(0))
    assert decoder_processes_for(None, device="cuda", torch_threads=1, gpus=1) == max(1, min(32, cores - 1))
    assert decoder_processes_for(None, device="cuda", torch_threads=1, gpus=64) == 1


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _embed_on_worker(rows: pd.DataFrame, cfg: EmbedConfig) -> tuple[pd.DataFrame, list[int], bool, list[str]]:
    from jungletrap.udfs.embed import embed_partition

    handler = _Messages()
    logging.getLogger("jungletrap.decoding").addHandler(handler)
    try:
        frame = embed_partition(rows, settings=embed_settings(cfg))
    finally:
        logging.getLogger("jungletrap.decoding").removeHandler(handler)
    return frame, decoder_pids(), can_spawn_processes(), handler.messages


def _rows() -> pd.DataFrame:
    paths = real_video_paths()[:3]
    return pd.DataFrame({"video_id": [p.name for p in paths], "path": [str(p) for p in paths],
                         "size_bytes": [p.stat().st_size for p in paths]})


def test_workers_decode_in_processes_and_a_daemonic_worker_falls_back_to_threads(dask_client: Client) -> None:
    cfg = EmbedConfig(backbone="tiny_cnn", batch_size=8, device="cpu")
    rows = _rows()
    in_processes, pids, spawnable, warnings = dask_client.submit(_embed_on_worker, rows, cfg, pure=False).result()
    assert spawnable and len(pids) == 1 and not warnings  # auto: one decoder process for a 1-thread CPU worker
    assert (in_processes["status"] == "ok").all()
    with dask.config.set({"distributed.worker.daemon": True}), LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        in_threads, pids, spawnable, warnings = client.submit(_embed_on_worker, rows, cfg, pure=False).result()
    assert not spawnable and pids == []
    assert len(warnings) == 1 and "daemonic process" in warnings[0]
    assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in warnings[0]
    pd.testing.assert_frame_equal(in_threads.drop(columns="embedding"), in_processes.drop(columns="embedding"))
    for a, b in zip(in_threads["embedding"], in_processes["embedding"], strict=True):
        assert np.array_equal(a, b)


def test_decode_processes_zero_decodes_in_threads(caplog: pytest.LogCaptureFixture) -> None:
    jobs = [_job(p) for p in real_video_paths()[:2]]
    before = decoder_pids()
    with caplog.at_level(logging.WARNING):
        out = list(decode_in_order(jobs, processes=0, threads=2, ahead=2))
    assert decoder_pids() == before and not caplog.records
    assert all(error is None for _, _, error in out)


def _decode_two(path: str) -> list[str | None]:
    job = _job(path)
    return [error for _, _, error in decode_in_order([job, job], processes=2, threads=1, ahead=2)]


def test_a_worker_with_decoder_processes_exits_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    """A process joins its non-daemonic children before the executor's exit hook would stop them: without the
    decoders' own finalizer the worker hung until its nanny killed it ("still alive after 4.0 seconds")."""
    allow_worker_subprocesses()
    with caplog.at_level(logging.WARNING, logger="distributed.nanny"):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            assert client.submit(_decode_two, str(real_video_paths()[0]), pure=False).result() == [None, None]
            pids = client.submit(decoder_pids, pure=False).result()
            assert len(pids) >= 1
    assert not [r for r in caplog.records if "still alive" in r.getMessage()]
    assert not any(_alive(p) for p in pids)


def test_two_tasks_sharing_a_pool_survive_its_decoders_being_killed() -> None:
    """A worker with two threads runs two partitions on one pool: when its decoders die, whichever task sees it
    first replaces the pool, and the other task's clips (cancelled or broken with the old pool) are decoded
    again, not turned into error rows."""
    paths = real_video_paths()
    jobs = [_job(p) for p in paths * 6]
    results: dict[str, list] = {"a": [], "b": []}
    started = threading.Barrier(3)

    def run(name: str) -> None:
        for i, item in enumerate(decode_in_order(jobs, processes=3, threads=1, ahead=6)):
            results[name].append(item)
            if i == 0:
                started.wait()  # both tasks have their first clip, and more queued and in flight

    tasks = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for task in tasks:
        task.start()
    started.wait(timeout=60)
    killed = decoder_pids(3)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    for task in tasks:
        task.join(timeout=300)
    reference = {str(p): decode(_job(p)).frames for p in paths}
    assert killed
    for name in ("a", "b"):
        assert [pos for pos, _, _ in results[name]] == list(range(len(jobs)))
        for (_, clip, error), job in zip(results[name], jobs, strict=True):
            assert error is None, error
            assert np.array_equal(clip.frames, reference[job.source])


def test_a_decoder_killed_while_sending_its_clip_costs_no_clip_and_leaves_no_stuck_thread() -> None:
    """SIGKILL can land while a decoder writes its frames (megabytes) into the result pipe. That leaves half a
    message there and the pipe's lock held: the executor's thread waits forever for the rest, so it never reports
    the pool broken, and the other decoders wait forever for the lock. Before the fix every clip in flight became
    a "did not finish" error row at the hard limit, and the stuck thread hung the worker's exit (~1 run in 7 of
    the test above). The state is made exactly here: this process takes the lock and writes half a message, then
    one decoder is killed."""
    paths = real_video_paths()
    jobs = [_job(p, timeout_s=5.0) for p in paths * 4]  # hard limit 15 s: a clip waited out is an error row
    results = []
    manager = None
    for item in decode_in_order(jobs, processes=4, threads=1, ahead=8):
        results.append(item)
        if manager is None:
            pool = _decoder_processes(4).pool
            manager = pool._executor_manager_thread
            pipe = pool._result_queue
            pipe._wlock.acquire()
            os.write(pipe._writer.fileno(), struct.pack("!i", 1 << 30) + b"\x80")  # 1 GiB announced, 1 byte sent
            os.kill(decoder_pids(4)[0], signal.SIGKILL)
    assert manager is not None
    reference = {str(p): decode(_job(p)).frames for p in paths}
    assert [pos for pos, _, _ in results] == list(range(len(jobs)))
    for (_, clip, error), job in zip(results, jobs, strict=True):
        assert error is None, error
        assert np.array_equal(clip.frames, reference[job.source])
    manager.join(timeout=30)
    assert not manager.is_alive(), "the broken pool's executor thread is still waiting on the result pipe"
