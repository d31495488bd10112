"""Decoding and time-based sampling: real camera-trap clips, generated clips whose frames carry their own index."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from jungletrap import video as video_module
from jungletrap.schema import CONTAINER_COLUMNS, SIZE_BYTES, WARNING
from jungletrap.video import (
    ClipInfo,
    VideoDecodeError,
    clip_info,
    letterbox_box,
    read_clip,
    read_clip_sizes,
    sample_times,
)

from .conftest import real_video_paths

W, H = 64, 48  # generated clips: 2 rows x 8 columns of 8x24 blocks spell the frame index in binary
BITS = 16


def _barcode(index: int, width: int = W, height: int = H) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    bw, bh = width // (BITS // 2), height // 2
    for bit in range(BITS):
        if index >> bit & 1:
            row, col = divmod(bit, BITS // 2)
            img[row * bh : (row + 1) * bh, col * bw : (col + 1) * bw] = 255
    return img


def _read_barcode(frame: np.ndarray, size: int, width: int = W, height: int = H) -> int:
    """Frame index spelled by a letterboxed output frame (block centres, mapped through the letterbox)."""
    top, left, h, w = letterbox_box(width, height, size)
    index = 0
    for bit in range(BITS):
        row, col = divmod(bit, BITS // 2)
        y = top + int((row + 0.5) * h / 2)
        x = left + int((col + 0.5) * w / (BITS // 2))
        index |= int(frame[y - 1 : y + 2, x - 1 : x + 2].mean() > 128) << bit
    return index


def _write_clip(path: Path, times: Sequence[float], *, rate: int = 1000, fmt: str | None = None,
                codec: str = "libx264", width: int = W, height: int = H,
                container_options: dict[str, str] | None = None,
                image: Callable[[int], np.ndarray] | None = None, bframes: int = 0) -> Path:
    """Encode one barcoded frame per timestamp (seconds, on a 1/rate tick: 1000 for VFR or rounded timestamps)."""
    tick = Fraction(1, rate)
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = tick
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "ultrafast", "x264-params": f"bframes={bframes}:b-adapt=0"}
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(image(i) if image else _barcode(i), format="rgb24")
            frame.pts, frame.time_base = round(t * rate), tick
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _cfr(fps: int, seconds: float) -> list[float]:
    return [i / fps for i in range(round(fps * seconds))]


def _on_screen(times: Sequence[float], targets: Sequence[float]) -> list[int]:
    """Reference rule, written independently: last frame at or before each target (first frame before it)."""
    picked = [max([i for i, t in enumerate(times) if t <= target + 1e-3], default=0) for target in targets]
    return sorted(set(picked))


# -- sample_times -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "fps", "max_s", "expected"), [
    (60.0, 3.0, 15.0, 45), (10.0, 3.0, 15.0, 30), (0.2, 3.0, 15.0, 1), (math.nan, 2.0, 4.0, 8), (-1.0, 1.0, 3.0, 3),
    (7.5, 2.0, 15.0, 15), (1 / 3, 3.0, 15.0, 1), (2.0003, 3.0, 15.0, 6),  # last: duration off by timestamp rounding
])
def test_sample_times_fps_mode(duration: float, fps: float, max_s: float, expected: int) -> None:
    times = sample_times(duration, sample_fps=fps, max_seconds=max_s)
    window = min(duration, max_s) if duration > 0 else max_s
    assert len(times) == expected
    np.testing.assert_allclose(times, np.arange(expected) / fps)
    assert times[0] == 0.0 and (len(times) == 1 or times[-1] < window)


def test_sample_times_n_frames_spread_over_window() -> None:
    np.testing.assert_allclose(sample_times(8.0, sample_fps=3, max_seconds=15, n_frames=4), [0, 2, 4, 6])
    np.testing.assert_allclose(sample_times(60.0, sample_fps=3, max_seconds=15, n_frames=5), [0, 3, 6, 9, 12])
    np.testing.assert_allclose(sample_times(math.nan, sample_fps=3, max_seconds=10, n_frames=2), [0, 5])


@pytest.mark.parametrize("kwargs", [{"sample_fps": 0, "max_seconds": 15}, {"sample_fps": 3, "max_seconds": 0},
                                    {"sample_fps": 3, "max_seconds": 15, "n_frames": 0}])
def test_sample_times_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        sample_times(10.0, **kwargs)  # type: ignore[arg-type]


# -- real clips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", real_video_paths(), ids=lambda p: p.name)
def test_real_clip_gives_one_frame_per_real_second(path: Path) -> None:
    with av.open(str(path)) as c:
        times = [f.time for f in c.decode(video=0)]
    window = min(len(times), 15)  # every clip is 1 fps from 0 s (checked below through fps and duration_s)
    expected = _on_screen(times, [k / 3 for k in range(3 * window)])

    frames, info = read_clip(path, sample_fps=3, max_seconds=15, size=112)

    assert frames.shape == (len(expected), 112, 112, 3) and frames.dtype == np.uint8
    assert math.isclose(info.fps, 1.0) and abs(info.duration_s - len(times)) <= 1
    assert info.width > info.height > 0 and info.size_bytes == path.stat().st_size
    assert info.bit_rate == pytest.approx(info.size_bytes * 8 / info.duration_s, rel=0.01)  # the file's rate
    assert not info.has_audio and info.codec in {"h264", "mpeg4", "msmpeg4"}
    assert len(expected) <= info.decoded_frames <= len(expected) + 2
    top, _, h, _ = letterbox_box(info.width, info.height, 112)
    assert frames[:, :top].max() == 0 and frames[:, top + h :].max() == 0, "letterbox bands must be black"
    assert frames[:, top : top + h].mean() > 20, "picture missing"
    assert info.warning is None, "a whole clip must not be reported as truncated"


@pytest.mark.parametrize("path", real_video_paths()[:3], ids=lambda p: p.name)
def test_one_decode_at_several_sizes_gives_each_size_as_its_own_decode(path: Path) -> None:
    """Several backbones share a decode: each size's frames must be exactly what a decode at that size gives."""
    frames, info = read_clip_sizes(path, sample_fps=3, max_seconds=15, sizes=(224, 64, 260))
    assert list(frames) == [224, 64, 260]
    for size, got in frames.items():
        alone, alone_info = read_clip(path, sample_fps=3, max_seconds=15, size=size)
        assert got.shape == alone.shape and np.array_equal(got, alone), size
        assert alone_info == info


def test_real_clip_quirks() -> None:
    clips = {p.name: p for p in real_video_paths()}
    short, _ = read_clip(clips["01170043.MP4"], sample_fps=3, max_seconds=15)
    assert short.shape[0] == 6
    assert clip_info(clips["PICT0074.ASF"]).declared_frames == -1  # ASF declares no frame count
    frames, info = read_clip(clips["FID_31_Abel_2013-5-6_0027.AVI"], sample_fps=1, max_seconds=120)
    assert info.declared_frames == info.decoded_frames + 1 == frames.shape[0] + 1  # declares one frame too many
    # Its missing frame is t=1 s (frame 0 stays on screen for 2 s): 14 real pictures in the first 15 s, not 15.
    assert read_clip(clips["FID_31_Abel_2013-5-6_0027.AVI"], sample_fps=3, max_seconds=15)[0].shape[0] == 14
    for name in ("f4636736.avi", "PICT0074.ASF"):  # 'Taï_T124', 'card 1.2_location'
        assert read_clip(clips[name], sample_fps=3, max_seconds=15)[0].shape[0] == 15


def test_clip_info_matches_read_clip_and_schema() -> None:
    path = real_video_paths()[0]
    info = clip_info(path)
    assert isinstance(info, ClipInfo) and info.decoded_frames == -1
    assert list(info.as_dict()) == [*CONTAINER_COLUMNS, SIZE_BYTES, WARNING] and info.warning is None
    read_info = read_clip(path, sample_fps=3, max_seconds=15)[1]
    assert {**read_info.as_dict(), "decoded_frames": -1} == info.as_dict()


# -- generated clips: which frames are chosen ---------------------------------------------------------------------


@pytest.mark.parametrize(("fps", "seconds", "rate"), [
    (1, 40, 1), (1, 6, 1), (3, 7, 3), (15, 1, 15), (15, 20, 15), (30, 2, 30), (30, 2, 1000), (30, 16, 30), (30, 40, 30),
])
def test_sampling_picks_the_frames_on_screen(tmp_path: Path, fps: int, seconds: float, rate: int) -> None:
    """Targets every 1/3 s; ``rate`` 1000 rounds a 30 fps clip's timestamps to milliseconds."""
    times = _cfr(fps, seconds)
    clip = _write_clip(tmp_path / "clip.mp4", times, rate=rate)
    targets = [k / 3 for k in range(math.ceil(3 * min(seconds, 15)))]
    expected = _on_screen(times, targets)

    frames, info = read_clip(clip, sample_fps=3, max_seconds=15, size=96)

    assert [_read_barcode(f, 96) for f in frames] == expected
    assert len(expected) == min(len(targets), sum(t < 15 for t in times))  # never more than the real frames
    assert info.decoded_frames <= round(min(seconds, 15) * fps) + 1, "decoded past max_seconds"
    assert info.warning is None


@pytest.mark.parametrize(("fps", "rate", "jitter"), [(30, 30, False), (25, 1000, True), (60, 60, False)])
def test_unneeded_b_frames_are_skipped_without_changing_the_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fps: int, rate: int, jitter: bool) -> None:
    """B-frames far from every target are not decoded; picks and ``decoded_frames`` equal a full decode's."""
    rng = np.random.default_rng(fps)
    times = [t + (rng.uniform(0, 0.4 / fps) if jitter and i else 0.0) for i, t in enumerate(_cfr(fps, 12))]
    clip = _write_clip(tmp_path / "b.mp4", times, rate=rate, bframes=3)
    with av.open(str(clip)) as c:
        assert PictureType.B in {f.pict_type for f in c.decode(video=0)}, "the clip must have B-frames"
    targets = [k / 3 for k in range(36)]
    decoded: list[int] = []
    frames_of = video_module._FrameReader.frames

    def counting(reader: video_module._FrameReader):  # type: ignore[no-untyped-def]
        for item in frames_of(reader):
            decoded.append(1)
            yield item

    monkeypatch.setattr(video_module._FrameReader, "frames", counting)
    frames, info = read_clip(clip, sample_fps=3, max_seconds=15, size=96)
    n_skipping = len(decoded)
    monkeypatch.setattr(video_module._FrameReader, "_skippable", lambda self, packet: False)
    decoded.clear()
    full, full_info = read_clip(clip, sample_fps=3, max_seconds=15, size=96)

    assert [_read_barcode(f, 96) for f in frames] == _on_screen(times, targets)
    assert np.array_equal(frames, full) and info == full_info
    assert n_skipping < 0.9 * len(decoded), f"only {len(decoded) - n_skipping} of {len(decoded)} frames skipped"


@pytest.mark.parametrize(("fps", "seconds", "n_frames"), [(30, 10, 8), (15, 40, 16), (3, 2, 4), (1, 5, 9)])
def test_n_frames_mode(tmp_path: Path, fps: int, seconds: float, n_frames: int) -> None:
    times = _cfr(fps, seconds)
    clip = _write_clip(tmp_path / "clip.mp4", times, rate=fps)
    window = min(seconds, 15)
    expected = _on_screen(times, [k * window / n_frames for k in range(n_frames)])

    frames, _ = read_clip(clip, sample_fps=3, max_seconds=15, n_frames=n_frames, size=64)

    assert [_read_barcode(f, 64) for f in frames] == expected
    assert (len(frames) == n_frames) == (n_frames <= window * fps)  # exactly n_frames when the clip has them


def test_variable_frame_rate_uses_timestamps(tmp_path: Path) -> None:
    times = [0, 0.05, 0.5, 0.52, 1.4, 2.0, 2.01, 2.9, 3.5, 4.2, 5.0, 6.0, 6.4]
    clip = _write_clip(tmp_path / "vfr.mp4", times)
    frames, _ = read_clip(clip, sample_fps=2, max_seconds=5, size=64)
    assert [_read_barcode(f, 64) for f in frames] == _on_screen(times, [k / 2 for k in range(10)])


@pytest.mark.parametrize("n_frames", [None, 5])
def test_unknown_duration(tmp_path: Path, n_frames: int | None) -> None:
    """Matroska written to a pipe has no duration and no frame count: sample from what the packets show."""
    buf = _NonSeekable()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(25):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(_barcode(i), format="rgb24")))
        out.mux(stream.encode())
    clip = tmp_path / "nodur.mkv"
    clip.write_bytes(bytes(buf.data))
    frames, info = read_clip(clip, sample_fps=3, max_seconds=15, n_frames=n_frames, size=64)
    assert math.isnan(info.duration_s) and info.declared_frames == -1
    targets = [k / 3 for k in range(8)] if n_frames is None else [k * 0.5 for k in range(5)]
    assert [_read_barcode(f, 64) for f in frames] == _on_screen([i / 10 for i in range(25)], targets)


@pytest.mark.parametrize("n_frames", [None, 4])
def test_raw_stream_without_timestamps(tmp_path: Path, n_frames: int | None) -> None:
    """A raw H.264 elementary stream has no timestamps, duration or count: frames are timed at the stream's rate."""
    clip = _write_clip(tmp_path / "raw.h264", _cfr(10, 4), rate=10, fmt="h264")
    frames, info = read_clip(clip, sample_fps=3, max_seconds=15, n_frames=n_frames, size=64)
    assert math.isnan(info.duration_s) and info.declared_frames == -1 and info.fps > 0
    times = [i / info.fps for i in range(40)]
    span = 40 / info.fps
    targets = [k / 3 for k in range(math.ceil(3 * span))] if n_frames is None else [k * span / 4 for k in range(4)]
    assert [_read_barcode(f, 64) for f in frames] == _on_screen(times, targets)


class _NonSeekable:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += bytes(b)
        return len(b)


def test_clip_shorter_than_one_sample_period(tmp_path: Path) -> None:
    clip = _write_clip(tmp_path / "blink.mp4", [0.0, 1 / 30])
    frames, info = read_clip(clip, sample_fps=3, max_seconds=15, size=64)
    assert [_read_barcode(f, 64) for f in frames] == [0] and info.decoded_frames == 2


# -- letterbox ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(64, 32), (32, 64)])
def test_letterbox_pads_the_short_side_with_black(tmp_path: Path, width: int, height: int) -> None:
    clip = _write_clip(tmp_path / "wide.mp4", [0.0], width=width, height=height,
                       image=lambda i: np.full((height, width, 3), 200, np.uint8))
    frame = read_clip(clip, sample_fps=1, max_seconds=1, size=96)[0][0]
    picture = frame.mean(axis=2) > 100
    rows, cols = np.flatnonzero(picture.any(axis=1)), np.flatnonzero(picture.any(axis=0))
    long_span = (rows if height > width else cols)
    short_span = (cols if height > width else rows)
    assert (long_span[0], long_span[-1]) == (0, 95), "the longer side must fill the frame (nothing cropped)"
    assert (short_span[0], short_span[-1]) == (24, 71), "a centred 2:1 picture spans 48 of 96 pixels"
    assert frame[~picture].max() == 0, "bands must be pure black"


# -- inputs and failures ------------------------------------------------------------------------------------------


def test_file_object_and_url(tmp_path: Path) -> None:
    import fsspec

    clip = _write_clip(tmp_path / "c.mp4", _cfr(10, 2))
    expected = read_clip(clip, sample_fps=3, max_seconds=15, size=64)[0]
    with open(clip, "rb") as fobj:
        np.testing.assert_array_equal(read_clip(fobj, sample_fps=3, max_seconds=15, size=64)[0], expected)
    with fsspec.open("memory://jt-test/c.mp4", "wb") as dst:
        dst.write(clip.read_bytes())
    frames, info = read_clip("memory://jt-test/c.mp4", sample_fps=3, max_seconds=15, size=64)
    np.testing.assert_array_equal(frames, expected)
    assert info.size_bytes == clip.stat().st_size
    fake = io.BytesIO(b"not a video at all")
    fake.name = "upload.avi"
    with pytest.raises(VideoDecodeError, match="upload.avi"):
        read_clip(fake, sample_fps=3, max_seconds=15)


@pytest.mark.parametrize(("name", "reason"), [
    ("empty.avi", "empty file"),
    ("text.avi", "not a readable video container"),
    ("missing.mp4", "file not found"),
    ("a dir.mp4", "is a directory"),
    ("broken link.mp4", "broken symlink"),
    ("audio.wav", "no video stream"),
])
def test_bad_inputs_raise_video_decode_error(tmp_path: Path, name: str, reason: str) -> None:
    (tmp_path / "empty.avi").touch()
    (tmp_path / "text.avi").write_text("hello, this is not a video\n" * 20)
    (tmp_path / "a dir.mp4").mkdir()
    (tmp_path / "broken link.mp4").symlink_to(tmp_path / "gone.mp4")
    with av.open(str(tmp_path / "audio.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
    path = tmp_path / name
    with pytest.raises(VideoDecodeError) as err:
        read_clip(path, sample_fps=3, max_seconds=15)
    assert str(err.value).startswith(f"{path}: {reason}") and "Traceback" not in str(err.value)


@pytest.mark.parametrize(("fmt", "codec", "options", "keeps_frames"), [
    ("mp4", "libx264", {}, False),  # the index (moov) is written last: half a file has none
    ("mp4", "libx264", {"movflags": "faststart"}, True),  # index first, as many cameras write it
    ("avi", "mpeg4", {}, True),  # its header keeps the frame count; FFmpeg re-estimates the duration from the bytes
    ("matroska", "libx264", {}, True),  # the duration is in the header, no frame count
])
def test_truncated_clip_returns_its_first_frames_with_a_warning_or_raises(
    tmp_path: Path, fmt: str, codec: str, options: dict[str, str], keeps_frames: bool
) -> None:
    times = _cfr(30, 10)
    clip = _write_clip(tmp_path / f"full.{fmt}", times, rate=30, fmt=fmt, codec=codec, container_options=options)
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    if not keeps_frames:
        with pytest.raises(VideoDecodeError, match="not a readable video container") as err:
            read_clip(cut, sample_fps=30, max_seconds=15, size=64)
        assert str(cut) in str(err.value)
        return
    frames, info = read_clip(cut, sample_fps=30, max_seconds=15, size=64)
    assert 0 < len(frames) <= info.decoded_frames < len(times) // 2 + 30
    assert [_read_barcode(f, 64) for f in frames] == list(range(len(frames)))
    end = len(frames) / 30
    assert info.warning is not None and info.warning.startswith(f"truncated: the video stream ends at {end:.2f} s "
                                                                "of 10.00 s declared"), info.warning
    if fmt == "avi":
        assert f"{info.decoded_frames} of 300 declared frames" in info.warning
    assert read_clip(clip, sample_fps=30, max_seconds=15, size=64)[1].warning is None  # the whole file
    # Only frames inside the sampled window count: the first 2 s of the cut clip are all there.
    assert read_clip(cut, sample_fps=3, max_seconds=2, size=64)[1].warning is None


def test_timeout_raises(tmp_path: Path) -> None:
    clip = _write_clip(tmp_path / "c.mp4", _cfr(30, 2))
    with pytest.raises(VideoDecodeError, match=r"c\.mp4: decode timed out after 1e-09s"):
        read_clip(clip, sample_fps=3, max_seconds=15, timeout_s=1e-9)
    assert read_clip(clip, sample_fps=3, max_seconds=15, timeout_s=None)[0].shape[0] == 6
