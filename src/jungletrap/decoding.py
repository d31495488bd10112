"""Clip decoding for the embed UDF, off the model's thread: a pool of decoder processes per worker.

Why processes and not threads: PyAV releases the GIL inside FFmpeg, but the frame loop, letterboxing and pixel
statistics are Python and numpy that take it, and so does a CPU model's Python between its ops. Decode threads
therefore slowed the model thread they were meant to feed (bench/embed.py, 2 vCPUs: stage / model-only 1.17;
a GPU worker on 16 cores embedded 15 clips/s, decode-bound). Decoder processes have interpreters of their own.

The processes are spawned (never forked from a process that runs torch threads), import no torch, ignore
SIGINT (the driver decides when to stop) and exit when their worker dies. They also make decoding safer: a
decoder that crashes or hangs inside FFmpeg is killed and replaced, and only its clip becomes an error row.

A daemonic process cannot have children (multiprocessing's rule, and Dask's default ``distributed.worker.daemon:
true``). There decoding falls back to threads in the worker with a warning; :func:`allow_worker_subprocesses`
lets the clusters jungletrap starts have decoder processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from jungletrap.pixels import pixel_stats
from jungletrap.storage import open_clip
from jungletrap.video import ClipInfo, VideoDecodeError, read_clip_sizes

__all__ = [
    "DecodeJob",
    "DecodedClip",
    "allow_worker_subprocesses",
    "can_spawn_processes",
    "decode",
    "decode_in_order",
    "decoder_processes_for",
    "decoder_pids",
]

log = logging.getLogger(__name__)

#: A decoder process still busy this long past ``2 x timeout_s + HARD_TIMEOUT_GRACE_S`` is stuck (in a system
#: call or FFmpeg, where the decoder's own timeout cannot fire) and is killed.
HARD_TIMEOUT_GRACE_S = 5.0
#: Decoder processes per worker are capped: each holds ~100 MB and a few clips of frames.
MAX_AUTO_PROCESSES = 32


@dataclass(frozen=True)
class DecodeJob:
    """One clip to decode: plain values only, so a decoder process never imports torch to unpickle it.

    ``more_sizes``: further square sizes the same sampled frames are letterboxed to (several backbones, one
    decode); ``size`` is the main one.
    """

    source: str
    sample_fps: float
    max_seconds: float
    n_frames: int | None
    size: int
    timeout_s: float
    codec_threads: int = 0
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)  # may hold credentials
    more_sizes: tuple[int, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.size, *self.more_sizes)))


@dataclass(frozen=True)
class DecodedClip:
    """The sampled frames (T x size x size x 3 uint8), the container facts and the pixel statistics, at the
    job's main size; ``more_sizes`` holds the same frames and their statistics at each further size."""

    frames: np.ndarray
    info: ClipInfo
    pixel_stats: dict[str, float]
    more_sizes: Mapping[int, tuple[np.ndarray, dict[str, float]]] = field(default_factory=dict)

    def at(self, size: int) -> tuple[np.ndarray, dict[str, float]]:
        """The frames and pixel statistics letterboxed to ``size`` (the main size or one of ``more_sizes``)."""
        if size in self.more_sizes:
            return self.more_sizes[size]
        if len(self.frames) and self.frames.shape[1] != size:
            raise KeyError(f"clip decoded at {[self.frames.shape[1], *self.more_sizes]}, not at {size}")
        return self.frames, self.pixel_stats


def decode(job: DecodeJob) -> DecodedClip:
    """Decode and sample one clip; raises :class:`VideoDecodeError` naming the file on bad input.

    Bad input is what FFmpeg or the file system reject (an FFmpeg error or ``OSError`` that ``read_clip`` did not
    already name): the clip's fault, so it becomes an error row. Anything else (``TypeError``, ``ValueError``,
    ...) is a bug in this code and is raised as it is, so that it fails the task instead of turning every clip
    into an error row.
    """
    try:
        with open_clip(job.source, job.storage_options) as source:  # a remote clip is read as a file object
            frames, info = read_clip_sizes(source, sample_fps=job.sample_fps, max_seconds=job.max_seconds,
                                           n_frames=job.n_frames, sizes=job.sizes, timeout_s=job.timeout_s,
                                           threads=job.codec_threads)
    except (av.error.FFmpegError, OSError) as err:  # av.error.ValueError etc. are FFmpegErrors too
        raise VideoDecodeError(f"{job.source}: cannot read ({type(err).__name__}: {err})") from None
    more = {size: (frames[size], pixel_stats(frames[size], info, size)) for size in job.sizes if size != job.size}
    return DecodedClip(frames[job.size], info, pixel_stats(frames[job.size], info, job.size), more)


def allow_worker_subprocesses() -> None:
    """Start Dask workers as non-daemonic processes from now on, so that they may run decoder processes.

    Sets ``distributed.worker.daemon: false`` in this process's Dask config (the nanny reads it whenever it
    starts or restarts a worker). For ``dask worker`` on other machines set ``DASK_DISTRIBUTED__WORKER__DAEMON=False``.
    """
    import dask

    dask.config.set({"distributed.worker.daemon": False})


def can_spawn_processes() -> bool:
    """False in a daemonic process (a Dask worker under the default config), which may not have children."""
    return not multiprocessing.current_process().daemon


def decoder_processes_for(setting: int | None, *, device: str, torch_threads: int, gpus: int = 1,
                          threads_per_decoder: int = 4) -> int:
    """How many decoder processes a worker runs: the configured number, or one per ``threads_per_decoder``
    CPU model threads (a clip decodes in ~0.2 core-seconds; Lite0 needs ~0.9 per clip and thread in torch, so
    4, and ~0.4 with OpenVINO, so the embed UDF passes 2 there), or on a GPU worker every core of its share of
    the machine but one (the GPU outruns any number of CPU decoders)."""
    if setting is not None:
        return setting
    if device.startswith("cuda"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return max(1, min(MAX_AUTO_PROCESSES, cores // max(1, gpus) - 1))
    return max(1, math.ceil(torch_threads / max(1, threads_per_decoder)))


def _exit_with_parent(parent_pid: int) -> None:
    """Decoder process initializer: ignore Ctrl-C and exit as soon as the worker that started it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _DecoderProcesses:
    """A worker's pool of decoder processes, shared by its tasks and replaced whole when one of them dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),))

    def replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """Kill ``broken``'s processes and start a new pool (once, however many tasks saw it break)."""
        with self._lock:
            if self.pool is broken:
                self.close()
                self.pool = self._new_pool()
            return self.pool

    def pids(self) -> list[int]:
        return [p.pid for p in (self.pool._processes or {}).values() if p.pid is not None]

    @staticmethod
    def has_dead_process(pool: ProcessPoolExecutor) -> bool:
        """True when a process of ``pool`` has exited. A decoder never exits on its own while its pool is in use,
        so this is a crash, a kill or the OOM killer, whether or not the executor has noticed (it cannot when
        the process died while writing its result, see :meth:`close`)."""
        for process in list((pool._processes or {}).values()):
            try:
                if process.exitcode is not None:
                    return True
            except ValueError:  # closed by the executor: it saw the process go
                return True
        return False

    def close(self) -> None:
        """Stop the decoders now: they hold nothing but clips of tasks that are over.

        A decoder killed while writing its result leaves half a message in the result pipe and the pipe's lock
        held: the executor's manager thread then waits forever for the rest (so it never marks the pool broken)
        and the other decoders wait forever for the lock. Once every decoder is dead, closing this process's
        own end of the pipe ends that wait (end of file), the executor fails what it still held with
        ``BrokenProcessPool``, and its thread exits instead of hanging the worker's exit.
        """
        pool = self.pool
        results = pool._result_queue  # None once shut down; read before shutdown() drops it
        processes = list((pool._processes or {}).values())
        for process in processes:  # no public kill() before Python 3.14
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)
        if results is not None and not any(process.is_alive() for process in processes):
            results._writer.close()


_POOLS: dict[int, _DecoderProcesses] = {}
_POOLS_LOCK = threading.Lock()
_warned_daemonic = False


def _close_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def _decoder_processes(n: int) -> _DecoderProcesses:
    with _POOLS_LOCK:
        if not _POOLS:
            # A process that exits joins its non-daemonic children *before* the executor's own exit hook tells
            # them to stop, so a Dask worker would hang until its nanny killed it: stop them first.
            multiprocessing.util.Finalize(None, _close_pools, exitpriority=10)
        if n not in _POOLS:
            _POOLS[n] = _DecoderProcesses(n)
        return _POOLS[n]


def decoder_pids(processes: int | None = None) -> list[int]:
    """PIDs of this process's decoder processes, or of its pool of ``processes`` (tests and diagnostics)."""
    with _POOLS_LOCK:
        return [pid for n, pool in _POOLS.items() if processes in (None, n) for pid in pool.pids()]


Decoded = tuple[int, DecodedClip | None, str | None]


def decode_in_order(jobs: Sequence[DecodeJob], *, processes: int, threads: int, ahead: int) -> Iterator[Decoded]:
    """Yield ``(position, clip, None)`` or ``(position, None, error)`` for every job, in order, while up to
    ``ahead`` later clips decode: in ``processes`` decoder processes, or (``processes == 0``, or a daemonic
    worker) in ``threads`` threads of this process."""
    global _warned_daemonic
    if processes > 0 and not can_spawn_processes():
        if not _warned_daemonic:
            log.warning("embed: this Dask worker is a daemonic process and may not start decoder processes, so "
                        "clips decode in threads that share the model's GIL (slower). Start workers with "
                        "DASK_DISTRIBUTED__WORKER__DAEMON=False (clusters jungletrap starts do this).")
            _warned_daemonic = True
        processes = 0
    if processes > 0:
        yield from _decode_in_processes(jobs, _decoder_processes(processes), max(ahead, 2 * processes))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        yield from _decode_with(pool, jobs, max(ahead, threads))


def _outcome(future: Future[DecodedClip], timeout_s: float | None = None) -> DecodedClip | str:
    """The clip, or the reason it is an error row. Only bad input (:class:`VideoDecodeError`) becomes a row:
    any other exception from :func:`decode` is a bug and is raised (it fails the partition's task loudly)."""
    try:
        return future.result(timeout=timeout_s)
    except VideoDecodeError as err:
        return str(err)


def _as_decoded(pos: int, outcome: DecodedClip | str) -> Decoded:
    return (pos, None, outcome) if isinstance(outcome, str) else (pos, outcome, None)


def _decode_with(pool: Executor, jobs: Sequence[DecodeJob], ahead: int) -> Iterator[Decoded]:
    pending: deque[tuple[int, Future[DecodedClip]]] = deque()
    positions = iter(range(len(jobs)))
    for pos in positions:
        pending.append((pos, pool.submit(decode, jobs[pos])))
        if len(pending) >= ahead:
            break
    while pending:
        pos, future = pending.popleft()
        outcome = _outcome(future)
        nxt = next(positions, None)
        if nxt is not None:  # keep the pool busy while the caller runs the model
            pending.append((nxt, pool.submit(decode, jobs[nxt])))
        yield _as_decoded(pos, outcome)


def _hard_limit_s(job: DecodeJob) -> float:
    return 2 * job.timeout_s + HARD_TIMEOUT_GRACE_S


def _wait(job: DecodeJob, future: Future[DecodedClip], pool: ProcessPoolExecutor,
          workers: _DecoderProcesses) -> DecodedClip | str:
    """The clip's outcome, or FutureTimeout past the hard limit, or CancelledError when its pool was replaced
    while it waited: a replaced pool's processes are dead, and a future sent to it just as it broke may never
    be settled (the executor's broken flag and its submit race), so it is sent again rather than waited for."""
    deadline = time.monotonic() + _hard_limit_s(job)
    dead_seen = False
    while True:
        try:
            return _outcome(future, min(1.0, max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            if time.monotonic() >= deadline:
                raise
            if pool is not workers.pool and not future.done():
                raise CancelledError from None
            # A dead decoder that the executor has not reported within a second: it died writing its result
            # and the executor never will (see _DecoderProcesses.close); treat the pool as broken now, not at
            # the hard limit with an error row.
            if workers.has_dead_process(pool):
                if dead_seen and not future.done():
                    raise BrokenProcessPool("a decoder process died and its pool did not report it") from None
                dead_seen = True


def _succeeded(future: Future[DecodedClip]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _decode_in_processes(jobs: Sequence[DecodeJob], workers: _DecoderProcesses, ahead: int) -> Iterator[Decoded]:
    """The process side of :func:`decode_in_order`. Another task of the same worker may replace the shared pool
    at any time, so every future is kept with the pool it was sent to, and what a replaced pool had not
    finished (broken, or cancelled by the shutdown) is sent again to the current one."""
    pending: deque[tuple[int, Future[DecodedClip], ProcessPoolExecutor]] = deque()
    positions = iter(range(len(jobs)))

    def submit(pos: int) -> tuple[int, Future[DecodedClip], ProcessPoolExecutor]:
        pool = workers.pool
        try:
            return pos, pool.submit(decode, jobs[pos]), pool
        except (BrokenProcessPool, RuntimeError):  # broken, or shut down by another task's replacement
            pool = workers.replace(pool)
            return pos, pool.submit(decode, jobs[pos]), pool

    def fill() -> None:
        while len(pending) < ahead and (pos := next(positions, None)) is not None:
            pending.append(submit(pos))

    def resubmit() -> None:
        """Send what a replaced pool had not finished to the current one."""
        for i, (pos, future, pool) in enumerate(pending):
            if pool is not workers.pool and not _succeeded(future):
                pending[i] = submit(pos)

    fill()
    while pending:
        pos, future, pool = pending.popleft()
        job = jobs[pos]
        try:
            outcome = _wait(job, future, pool, workers)
        except CancelledError:  # the pool was replaced before this clip was decoded: send it again
            pending.appendleft(submit(pos))
            resubmit()
            continue
        except FutureTimeout:
            workers.replace(pool)
            outcome = (f"{job.source}: decoding did not finish within {_hard_limit_s(job):.0f} s "
                       "(decode_timeout_s x 2 + grace); its decoder process was killed")
        except BrokenProcessPool:  # some decoder died: this clip's, or another one's in the same pool
            workers.replace(pool)
            outcome = _decode_alone(job, workers)
        resubmit()
        fill()
        yield _as_decoded(pos, outcome)


def _decode_alone(job: DecodeJob, workers: _DecoderProcesses) -> DecodedClip | str:
    """Retry a clip whose pool broke while it was in flight, with nothing else of this task running: if its
    decoder dies again the clip is taken to be the cause and becomes an error row."""
    for _ in range(3):  # another task replacing the shared pool meanwhile is not this clip's doing
        pool = workers.pool
        try:
            future = pool.submit(decode, job)
        except RuntimeError:  # broken or shut down meanwhile (BrokenProcessPool is a RuntimeError)
            workers.replace(pool)
            continue
        try:
            return _wait(job, future, pool, workers)
        except CancelledError:
            continue
        except FutureTimeout:
            workers.replace(pool)
            return (f"{job.source}: decoding did not finish within {_hard_limit_s(job):.0f} s; "
                    "its decoder process was killed")
        except BrokenProcessPool:
            workers.replace(pool)
            return f"{job.source}: the decoder process crashed on this clip (twice); FFmpeg could not read it"
    return f"{job.source}: not decoded: the worker's decoder processes kept failing"
