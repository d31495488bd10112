"""Decode a camera-trap clip into a few letterboxed RGB frames sampled in time, plus its container facts.

PyAV (FFmpeg) rather than OpenCV: it gives presentation timestamps, threaded decoding, and resizes and converts
in swscale only the frames that are kept, so skipped frames are never turned into RGB.

Sampling is defined in time. Target times are ``k / sample_fps`` (or ``n_frames`` times spread evenly) over
``[0, min(duration, max_seconds))``, and each target takes the frame *on screen* at that time: the last frame whose
timestamp is at or before it (the first frame for targets before it), never a frame from outside the clip or past
``max_seconds``. Several targets on one real frame (a 1 fps clip sampled at 3 fps) keep it once, so the result has
fewer frames (``frames.shape[0]`` is the true count) and nothing is duplicated or invented. Decoding stops at the
frame after the last target.

Frames are letterboxed, not cropped: the longer side is resized to ``size`` and the other is centred between black
bands. Camera traps often catch animals at the frame edge; a centre crop of a 16:9 frame would drop 44% of it.
:func:`read_clip_sizes` letterboxes each picked frame at several sizes from the one decode (several backbones,
each at its own input size): every size's frames are exactly those :func:`read_clip` gives at that size.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import av
import av.container
import numpy as np
from av.video.reformatter import VideoReformatter

__all__ = ["ClipInfo", "VideoDecodeError", "clip_info", "letterbox_box", "read_clip", "read_clip_sizes",
           "sample_times"]

Source = str | os.PathLike[str] | BinaryIO

#: Slack when comparing timestamps with target times: container time bases round (1 ms in ASF/MKV).
_TIME_TOLERANCE_S = 1e-3
#: Frame interval assumed for streams with neither timestamps nor a frame rate (FFmpeg's own default rate).
_FALLBACK_FPS = 25.0


class VideoDecodeError(Exception):
    """A clip could not be read; the message names the file and the reason, fit for an error row."""


@dataclass(frozen=True)
class ClipInfo:
    """Container facts of one clip; fields are ``schema.CONTAINER_COLUMNS``, ``SIZE_BYTES`` and ``WARNING``, in order.

    ``fps``, ``duration_s`` and ``bit_rate`` are NaN when unknown; ``declared_frames`` is -1 when the container
    declares no count (it may also be wrong); ``decoded_frames`` counts the frames the decoder produced before
    ``read_clip`` stopped (including the one look-ahead frame that closes the window), -1 from ``clip_info``.
    ``warning`` (``read_clip`` only) says why real frames inside the sampled window are missing (a truncated
    or partly corrupt file), None when nothing was lost.
    """

    codec: str
    width: int
    height: int
    fps: float
    duration_s: float
    declared_frames: int
    decoded_frames: int
    bit_rate: float
    has_audio: bool
    size_bytes: int
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict keyed by the schema's column names (for a DataFrame row)."""
        return asdict(self)


def sample_times(
    duration_s: float, *, sample_fps: float, max_seconds: float, n_frames: int | None = None
) -> np.ndarray:
    """Target times in seconds from the clip start, ascending; never empty (time 0 is always a target).

    The window is ``[0, min(duration_s, max_seconds))``, or ``[0, max_seconds)`` when the duration is unknown (NaN
    or not positive). Without ``n_frames`` the targets are ``k / sample_fps`` in the window, less its last
    millisecond (timestamp rounding must not add a target on a sliver of the last frame); with it, ``n_frames``
    times spread evenly from 0 (``k * window / n_frames``).
    """
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    window = min(duration_s, max_seconds) if duration_s > 0 else max_seconds  # NaN > 0 is False
    if n_frames is not None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        return np.arange(n_frames, dtype=np.float64) * (window / n_frames)
    if not sample_fps > 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    count = max(1, math.ceil((window - _TIME_TOLERANCE_S) * sample_fps))
    return np.arange(count, dtype=np.float64) / sample_fps


def letterbox_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the picture inside a ``size`` square letterbox; shared with pixel statistics."""
    scale = size / max(width, height)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - h) // 2, (size - w) // 2, h, w


def read_clip(
    path: Source,
    *,
    sample_fps: float,
    max_seconds: float,
    n_frames: int | None = None,
    size: int = 224,
    timeout_s: float | None = 120.0,
    threads: int = 0,
) -> tuple[np.ndarray, ClipInfo]:
    """Decode the frames on screen at the :func:`sample_times` targets, letterboxed to ``size`` x ``size``.

    Args:
        path: local path, fsspec URL (``s3://…``) or a binary file object (named in errors by its ``.name``).
        sample_fps, max_seconds, n_frames: the sampling, see :func:`sample_times`.
        size: side of the square output frames.
        timeout_s: wall-clock budget for the clip, checked between packets; None for no limit.
        threads: FFmpeg decoder threads for this clip; 0 lets FFmpeg choose (about one per core). Callers
            decoding several clips at once split the cores between them instead.

    Returns:
        ``(frames, info)``: uint8 ``T x size x size x 3`` RGB in time order, T >= 1. ``T`` can be below the number
        of targets (short, low-frame-rate or truncated clips) and is the true count. ``info.warning`` is set when
        real frames were lost: the stream ends before the length its container declares (a truncated file), or
        packets could not be decoded.

    Raises:
        VideoDecodeError: missing, empty, non-video or undecodable input, or the timeout. A clip that decodes some
            frames before breaking returns those instead (with ``info.warning`` saying so).
    """
    frames, info = read_clip_sizes(path, sample_fps=sample_fps, max_seconds=max_seconds, n_frames=n_frames,
                                   sizes=(size,), timeout_s=timeout_s, threads=threads)
    return frames[size], info


def read_clip_sizes(
    path: Source,
    *,
    sample_fps: float,
    max_seconds: float,
    n_frames: int | None = None,
    sizes: Sequence[int] = (224,),
    timeout_s: float | None = 120.0,
    threads: int = 0,
) -> tuple[dict[int, np.ndarray], ClipInfo]:
    """:func:`read_clip` at several sizes from one decode: ``{size: T x size x size x 3}``, the same T for all."""
    if not sizes:
        raise ValueError("read_clip_sizes needs at least one size")
    sample_times(0.0, sample_fps=sample_fps, max_seconds=max_seconds, n_frames=n_frames)  # validate up front
    budget = _Budget(_source_name(path), timeout_s)
    sizes = tuple(dict.fromkeys(sizes))
    with _opened(path) as (container, size_bytes):
        info = _container_info(container, _video_stream(container, budget.name), size_bytes)
        duration = info.duration_s
        reopen = n_frames is not None and not duration > 0
        if reopen:  # n_frames over an unknown length: measure it from packets; raw H.264 cannot seek back
            duration = _demuxed_span(container, max_seconds=max_seconds, fps=info.fps, budget=budget)
        targets = sample_times(duration, sample_fps=sample_fps, max_seconds=max_seconds, n_frames=n_frames)
        if not reopen:
            picked, decoded, lost = _pick(container, targets, fps=info.fps, sizes=sizes, budget=budget,
                                          threads=threads)
    if reopen:
        with _opened(path) as (container, _):
            picked, decoded, lost = _pick(container, targets, fps=info.fps, sizes=sizes, budget=budget,
                                          threads=threads)
    if not picked[sizes[0]]:
        raise VideoDecodeError(f"{budget.name}: no frame could be decoded (truncated or corrupt)")
    warning = lost.warning(info, decoded=decoded, max_seconds=max_seconds)
    return ({size: np.stack(frames) for size, frames in picked.items()},
            ClipInfo(**{**info.as_dict(), "decoded_frames": decoded, "warning": warning}))


def clip_info(path: Source) -> ClipInfo:
    """Container facts without decoding pixels (``decoded_frames`` is -1); raises :class:`VideoDecodeError`."""
    with _opened(path) as (container, size_bytes):
        return _container_info(container, _video_stream(container, _source_name(path)), size_bytes)


class _Budget:
    """The per-clip wall-clock limit, checked cooperatively in the demux loops."""

    def __init__(self, name: str, timeout_s: float | None) -> None:
        self.name, self.timeout_s = name, timeout_s
        self._deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s

    def check(self) -> None:
        if time.monotonic() > self._deadline:
            raise VideoDecodeError(f"{self.name}: decode timed out after {self.timeout_s:g}s")


@dataclass(frozen=True)
class _Losses:
    """What a decode saw of lost frames: where the stream ended (None: it was not read to its end), why reading
    stopped early (a demuxer error), and how many packets could not be decoded."""

    stream_end_s: float | None
    stopped_by: str | None
    bad_packets: int

    def warning(self, info: ClipInfo, *, decoded: int, max_seconds: float) -> str | None:
        """Why real frames inside ``[0, max_seconds)`` are missing, or None.

        The stream is truncated when it ends more than half a frame before the length the container declares
        (its duration, or its frame count over its rate, whichever is longer: a cut AVI re-estimates its duration
        from the bytes left but keeps the frame count of its header). A container that declares no length can
        only say that reading stopped on an error.
        """
        notes = []
        if self.stream_end_s is not None:
            declared = _declared_length_s(info)
            slack = 0.5 / (info.fps if info.fps > 0 else _FALLBACK_FPS)
            if min(declared, max_seconds) > self.stream_end_s + slack:
                counted = f", {decoded} of {info.declared_frames} declared frames" if info.declared_frames > 0 else ""
                cause = f" ({self.stopped_by})" if self.stopped_by else ""
                notes.append(f"truncated: the video stream ends at {self.stream_end_s:.2f} s of {declared:.2f} s "
                             f"declared{counted}{cause}")
            elif self.stopped_by and not declared > 0:
                notes.append(f"truncated: reading stopped at {self.stream_end_s:.2f} s ({self.stopped_by}); "
                             "the container declares no length")
        if self.bad_packets:
            notes.append(f"{self.bad_packets} packet(s) could not be decoded")
        return "; ".join(notes) or None


def _declared_length_s(info: ClipInfo) -> float:
    """The clip's length as its container declares it, 0 when it declares none."""
    by_count = info.declared_frames / info.fps if info.declared_frames > 0 and info.fps > 0 else 0.0
    return max(info.duration_s if info.duration_s > 0 else 0.0, by_count)


def _pick(
    container: av.container.InputContainer, targets: np.ndarray, *, fps: float, sizes: tuple[int, ...],
    budget: _Budget, threads: int = 0,
) -> tuple[dict[int, list[np.ndarray]], int, _Losses]:
    """The letterboxed frames on screen at ``targets``, how many frames were decoded to find them, and what
    was lost on the way."""
    stream = _video_stream(container, budget.name)
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    picker = _Picker(targets, sizes)
    reader = _FrameReader(container, stream, targets, fps=fps, budget=budget)
    decoded = picker.run(reader.frames())
    losses = _Losses(picker.stream_end_s, reader.stopped_by, reader.bad_packets)
    return picker.picked, reader.frames_read(decoded, last_target=float(targets[-1])), losses


class _Picker:
    """Streams frames past sorted targets and converts only the frame on screen at each one, once (per size)."""

    def __init__(self, targets: np.ndarray, sizes: tuple[int, ...]) -> None:
        self.targets, self.sizes, self.i = targets, sizes, 0
        self.picked: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
        self.stream_end_s: float | None = None  # set when the stream ended before every target was served
        self._last: av.VideoFrame | None = None
        # One swscale context per size for the clip: frame.reformat() builds one per frame, ~20x slower on small
        # clips (a context is rebuilt whenever the output size changes, hence one per size).
        self._reformatters = {size: VideoReformatter() for size in sizes}

    def run(self, frames: Iterator[tuple[av.VideoFrame, float]]) -> int:
        """Consume ``(frame, seconds)`` pairs until every target is served; return how many were decoded."""
        prev: av.VideoFrame | None = None
        prev_t = end = -math.inf
        decoded = 0
        for frame, t in frames:
            decoded += 1
            t = max(t, prev_t)
            while self.i < len(self.targets) and self.targets[self.i] + _TIME_TOLERANCE_S < t:
                self._pick(frame if prev is None else prev)  # a target before the first frame gets the first
            if self.i == len(self.targets):
                return decoded
            own = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
            step = own or (t - prev_t if prev is not None else 0.0)  # how long it stays on screen
            prev, prev_t, end = frame, t, t + step
        # The stream ended: its last frame is on screen until its own end, not forever (but keep one frame).
        self.stream_end_s = end if prev is not None else None
        while prev is not None and self.i < len(self.targets):
            if self.picked[self.sizes[0]] and self.targets[self.i] >= end - _TIME_TOLERANCE_S:
                break
            self._pick(prev)
        return decoded

    def _pick(self, frame: av.VideoFrame) -> None:
        self.i += 1
        if frame is not self._last:
            self._last = frame
            for size in self.sizes:
                self.picked[size].append(self._letterbox(frame, size))

    def _letterbox(self, frame: av.VideoFrame, size: int) -> np.ndarray:
        """Resize and convert in swscale so that the longer side is ``size``, then centre on black."""
        top, left, h, w = letterbox_box(frame.width, frame.height, size)
        rgb = self._reformatters[size].reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
        out = np.zeros((size, size, 3), dtype=np.uint8)
        out[top : top + h, left : left + w] = rgb.to_ndarray()
        return out


class _FrameReader:
    """Yield ``(frame, seconds from stream start)``; a corrupt packet is skipped, a broken tail ends the clip.

    Frames no target can land on are not decoded when nothing else needs them: before sending a packet whose
    timestamp lies more than a frame away from every target, the decoder is told to skip it if it is a
    non-reference frame (``skip_frame=NONREF``; FFmpeg still decodes it when later frames predict from it). With
    B-frames that is about a fifth of an H.264 stream at the seed's 3-in-30 sampling. The frames picked are exactly
    those of a full decode, and :meth:`frames_read` counts as a full decode would, so ``decoded_frames`` keeps
    its meaning.
    """

    def __init__(self, container: av.container.InputContainer, stream: av.VideoStream, targets: np.ndarray, *,
                 fps: float, budget: _Budget) -> None:
        self.container, self.stream, self.targets, self.budget = container, stream, targets, budget
        self.interval = 1.0 / (fps if fps > 0 else _FALLBACK_FPS)
        tb = stream.time_base
        self.tb = float(tb) if tb else 0.0
        self.start = float(stream.start_time * tb) if stream.start_time is not None and tb else None
        self._skipped: dict[int, float] = {}  # pts -> seconds of packets sent with a skip request, not yet seen
        self._times: list[float] = []  # seconds of the frames decoded
        self.stopped_by: str | None = None  # the demuxer error that ended the stream early, if any
        self.bad_packets = 0  # packets the decoder rejected (their frames are lost)

    def frames(self) -> Iterator[tuple[av.VideoFrame, float]]:
        ctx = self.stream.codec_context
        t, seen_frame, skipping = -self.interval, False, False
        try:
            for packet in self.container.demux(self.stream):
                self.budget.check()
                skip = seen_frame and self._skippable(packet)
                if skip != skipping:
                    ctx.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
                if skip:
                    self._skipped[packet.pts] = self._seconds(packet.pts)
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    self.bad_packets += 1
                    continue
                for frame in decoded:
                    seen_frame = True
                    if frame.time is None:  # raw elementary streams carry no timestamps: assume a constant rate
                        t += self.interval
                    else:
                        self.start = frame.time if self.start is None else self.start
                        t = frame.time - self.start
                        self._skipped.pop(frame.pts, None)  # a skip request on a reference frame is not honoured
                    self._times.append(t)
                    yield frame, t
        except (av.error.FFmpegError, OSError) as err:
            self.stopped_by = getattr(err, "strerror", None) or str(err)
            return  # truncated container: keep what decoded (the caller fails if that is nothing)

    def frames_read(self, decoded: int, *, last_target: float) -> int:
        """Frames a full decode would have produced: those up to the last target, plus the one that closes it."""
        if not self._skipped:
            return decoded
        times = np.array([*self._times, *self._skipped.values()])
        inside = int((times <= last_target + _TIME_TOLERANCE_S).sum())
        return inside + int(inside < len(times))

    def _seconds(self, pts: int) -> float:
        return pts * self.tb - (self.start or 0.0)

    def _skippable(self, packet: av.Packet) -> bool:
        """No target from a frame before this packet's time to two frames after it (unknown timing: never skip).

        The frame is on screen for targets in ``[at, at + step)``; the margins absorb timestamp rounding and
        frame-duration jitter.
        """
        if packet.pts is None or not self.tb or self.start is None or not packet.size:
            return False
        step = float(packet.duration * self.tb) if packet.duration else self.interval
        at = self._seconds(packet.pts)
        i = int(np.searchsorted(self.targets, at - step))
        return i == len(self.targets) or self.targets[i] > at + 2 * step


def _demuxed_span(
    container: av.container.InputContainer, *, max_seconds: float, fps: float, budget: _Budget
) -> float:
    """Clip length, up to ``max_seconds``, from packet timestamps alone (no decoding), for clips of unknown length."""
    stream = container.streams.video[0]
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else None
    interval = 1.0 / (fps if fps > 0 else _FALLBACK_FPS)
    end, count = 0.0, 0
    try:
        for packet in container.demux(stream):
            budget.check()
            if not packet.size:
                continue
            count += 1
            if packet.pts is None or not tb:
                end = max(end, count * interval)
            else:
                start = float(packet.pts * tb) if start is None else start
                end = max(end, float(packet.pts * tb) - start + (float((packet.duration or 0) * tb) or interval))
            if end >= max_seconds:
                break
    except (av.error.FFmpegError, OSError):
        pass  # truncated: the span seen so far is the span
    return min(end, max_seconds) if end > 0 else math.nan


def _container_info(container: av.container.InputContainer, stream: av.VideoStream, size_bytes: int) -> ClipInfo:
    """Facts the container declares (no decoding): NaN or -1 when missing; bit rate falls back to size/duration."""
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and stream.duration > 0:
        duration = float(stream.duration * stream.time_base)
    elif container.duration and container.duration > 0:
        duration = container.duration / av.time_base
    else:
        duration = math.nan
    if container.bit_rate:
        bit_rate = float(container.bit_rate)
    else:
        bit_rate = size_bytes * 8 / duration if size_bytes > 0 and duration > 0 else math.nan
    return ClipInfo(
        codec=stream.codec_context.name,
        width=int(stream.codec_context.width or 0),
        height=int(stream.codec_context.height or 0),
        fps=float(rate) if rate else math.nan,
        duration_s=duration,
        declared_frames=int(stream.frames) if stream.frames and stream.frames > 0 else -1,
        decoded_frames=-1,
        bit_rate=bit_rate,
        has_audio=len(container.streams.audio) > 0,
        size_bytes=size_bytes,
    )


def _video_stream(container: av.container.InputContainer, name: str) -> av.VideoStream:
    if _is_still_image(container):
        raise VideoDecodeError(f"{name}: a still image ({container.format.long_name}), not a video")
    if not container.streams.video:
        raise VideoDecodeError(f"{name}: no video stream in the container")
    return container.streams.video[0]


def _is_still_image(container: av.container.InputContainer) -> bool:
    """FFmpeg opens a picture (a JPEG renamed ``.avi``) as a one-frame stream with an image demuxer: ``image2``
    or one of the ``*_pipe`` family (jpeg_pipe, png_pipe, ...). It is not a clip, so it must be an error row."""
    names = container.format.name.split(",")
    return any(n in ("image2", "image2pipe") or n.endswith("_pipe") for n in names)


def _source_name(source: Source) -> str:
    """How errors name the clip: the path or URL as given, else a file object's ``.name``."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return str(getattr(source, "name", None) or "<file object>")


@contextmanager
def _opened(source: Source) -> Iterator[tuple[av.container.InputContainer, int]]:
    """Open ``source`` with PyAV; yield ``(container, size in bytes or -1)``; failures become VideoDecodeError.

    A caller's file object is rewound to where it was on exit, so that it can be opened again.
    """
    name = _source_name(source)
    if not isinstance(source, (str, os.PathLike)):
        position = source.tell()
        try:
            with _container(source, name, _fileobj_size(source)) as opened:
                yield opened
        finally:
            source.seek(position)
    elif "://" in name and not name.startswith("file://"):
        with _open_url(name) as fobj, _container(fobj, name, _fileobj_size(fobj)) as opened:
            yield opened
    else:
        path = name.removeprefix("file://")
        with _container(path, name, _local_size(path)) as opened:
            yield opened


@contextmanager
def _container(
    target: str | BinaryIO, name: str, size_bytes: int
) -> Iterator[tuple[av.container.InputContainer, int]]:
    if size_bytes == 0:
        raise VideoDecodeError(f"{name}: empty file (0 bytes)")
    try:
        container = av.open(target, mode="r")
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"{name}: not a readable video container ({err.strerror or err})") from None
    except OSError as err:
        raise VideoDecodeError(f"{name}: cannot open ({err.strerror or err})") from None
    with container:
        yield container, size_bytes


def _open_url(url: str) -> BinaryIO:
    import fsspec  # only remote URLs need it

    try:
        return fsspec.open(url, "rb").open()  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise VideoDecodeError(f"{url}: file not found") from None
    except (OSError, ValueError, ImportError) as err:
        raise VideoDecodeError(f"{url}: cannot open ({err})") from None


def _local_size(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reason = "broken symlink (its target is missing)" if os.path.islink(path) else "file not found"
        raise VideoDecodeError(f"{path}: {reason}") from None
    except OSError as err:
        raise VideoDecodeError(f"{path}: cannot stat ({err.strerror or err})") from None
    if os.path.isdir(path):
        raise VideoDecodeError(f"{path}: is a directory, not a video file")
    return st.st_size


def _fileobj_size(fobj: BinaryIO) -> int:
    try:
        here = fobj.tell()
        size = fobj.seek(0, os.SEEK_END)
        fobj.seek(here)
        return int(size)
    except (AttributeError, OSError, ValueError):
        return -1
