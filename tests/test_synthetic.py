"""Tests for the synthetic demo generator: competition layout, decodable clips, label properties, determinism
and the MANIFEST-last completeness contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pandas as pd
import pytest

from jungletrap import synthetic, synthetic_scene
from jungletrap.schema import CLASS_NAMES, FILENAME
from jungletrap.synthetic import (
    MANIFEST_NAME,
    DemoDataset,
    demo_dataset_complete,
    generate_demo_dataset,
    write_clip,
    write_static_clip,
)

N_VIDEOS = 40
SEED = 3
BLANK = "blank"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), n_videos=N_VIDEOS, seed=SEED, n_jobs=2)


@pytest.fixture(scope="module")
def manifest(demo: DemoDataset) -> dict[str, Any]:
    return json.loads(demo.manifest.read_text())


def _decode(path: Path) -> tuple[list[np.ndarray], str]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], codec


@pytest.fixture(scope="module")
def decoded(demo: DemoDataset, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per clip: decoded frame count, frame shape, codec name and mean HSV saturation of a few frames."""
    out = {}
    for clip in manifest["clips"]:
        frames, codec = _decode(demo.videos_dir / clip[FILENAME])
        some = frames[:: max(1, len(frames) // 4)]
        sat = float(np.mean([cv2.cvtColor(f, cv2.COLOR_RGB2HSV)[..., 1].mean() for f in some]))
        out[clip[FILENAME]] = {"n": len(frames), "shape": frames[0].shape, "codec": codec, "sat": sat}
    return out


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def _fake_writer(calls: list[str], fail_at: int | None = None) -> Any:
    """Stand-in for clip encoding: checks MANIFEST is absent while clips are written; optionally fails."""

    def write(plan: Any, videos_dir: Path) -> None:
        assert not (videos_dir.parent / MANIFEST_NAME).exists(), "MANIFEST.json must be written last"
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("encoder crashed")
        calls.append(plan.filename)
        (videos_dir / plan.filename).write_bytes(b"fake")

    return write


def test_csv_columns_are_filename_then_classes(demo: DemoDataset) -> None:
    for path in (demo.train_labels, demo.submission_format, demo.test_labels):
        assert list(_read(path).columns) == [FILENAME, *CLASS_NAMES], path.name


def test_splits_and_files_match(demo: DemoDataset, manifest: dict[str, Any]) -> None:
    train, sub, test = (_read(p) for p in (demo.train_labels, demo.submission_format, demo.test_labels))
    assert len(train) + len(sub) == N_VIDEOS
    assert len(sub) == round(N_VIDEOS * 0.25)
    assert list(sub[FILENAME]) == list(test[FILENAME])
    assert not set(train[FILENAME]) & set(sub[FILENAME])
    on_disk = {p.name for p in demo.videos_dir.iterdir()}  # no leftover temporary files either
    assert on_disk == set(train[FILENAME]) | set(sub[FILENAME])
    assert manifest["counts"]["train"] == len(train) and manifest["counts"]["test"] == len(sub)
    assert (sub[list(CLASS_NAMES)] == 0.5).all().all()


def test_clips_decode_with_declared_size_and_length(manifest: dict[str, Any], decoded: dict[str, Any]) -> None:
    for clip in manifest["clips"]:
        got = decoded[clip[FILENAME]]
        assert abs(got["n"] - clip["fps"] * clip["seconds"]) <= 1, clip
        assert got["shape"] == (clip["height"], clip["width"], 3), clip
        assert 2 - 1e-6 <= clip["seconds"] <= 12 + 1e-6


def test_labels_binary_blank_exclusive_and_multilabel(demo: DemoDataset, manifest: dict[str, Any]) -> None:
    labels = pd.concat([_read(demo.train_labels), _read(demo.test_labels)])
    values = labels[list(CLASS_NAMES)]
    assert set(np.unique(values.to_numpy())) <= {0, 1}
    per_clip = values.sum(axis=1)
    assert (per_clip >= 1).all()
    assert (per_clip[values[BLANK] == 1] == 1).all()
    assert (per_clip >= 2).any()
    assert (values.sum(axis=0) >= 1).all(), "every class occurs at least once"
    truth = {c[FILENAME]: set(c["classes"]) for c in manifest["clips"]}
    for _, row in labels.iterrows():
        assert {c for c in CLASS_NAMES if row[c] == 1} == truth[row[FILENAME]]


def test_night_clips_are_grey_and_day_clips_colour(manifest: dict[str, Any], decoded: dict[str, Any]) -> None:
    night = [decoded[c[FILENAME]]["sat"] for c in manifest["clips"] if c["night"]]
    day = [decoded[c[FILENAME]]["sat"] for c in manifest["clips"] if not c["night"]]
    assert night and day
    assert max(night) < 3, night
    assert min(day) > 20, day


def test_frame_rates_and_containers_mixed(manifest: dict[str, Any], decoded: dict[str, Any]) -> None:
    assert any(c["fps"] == 1 for c in manifest["clips"])
    assert len({c["fps"] for c in manifest["clips"]}) >= 3
    assert len({c["width"] / c["height"] for c in manifest["clips"]}) == 2  # 16:9 and 4:3
    codecs = {d["codec"] for d in decoded.values()}
    assert {"h264", "mpeg4"} <= codecs and codecs & {"msmpeg4v3", "msmpeg4", "wmv2"}, codecs
    assert len({Path(name).suffix for name in decoded}) >= 3


def test_same_seed_same_csvs(demo: DemoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    again = DemoDataset.at(tmp_path / "again")
    monkeypatch.setattr(synthetic, "_write_plan", _fake_writer([]))
    generate_demo_dataset(again.root, n_videos=N_VIDEOS, seed=SEED, n_jobs=1)
    for name in ("train_labels", "submission_format", "test_labels"):
        assert getattr(again, name).read_bytes() == getattr(demo, name).read_bytes(), name
    other = generate_demo_dataset(tmp_path / "other", n_videos=N_VIDEOS, seed=SEED + 1)
    assert other.train_labels.read_bytes() != demo.train_labels.read_bytes()


def test_every_class_twice_in_train_for_200(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = DemoDataset.at(tmp_path)
    monkeypatch.setattr(synthetic, "_write_plan", _fake_writer([]))
    generate_demo_dataset(tmp_path, n_videos=200, seed=11)
    train = _read(ds.train_labels)
    counts = train[list(CLASS_NAMES)].sum()
    assert (counts >= 2).all(), counts[counts < 2]
    assert 0.2 < counts[BLANK] / len(train) < 0.5  # still imbalanced: blank dominates
    assert counts.drop(BLANK).max() >= 5 * counts.min()


def test_complete_only_after_manifest(demo: DemoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert demo_dataset_complete(demo.root)
    assert demo_dataset_complete(demo.root, seed=SEED, n_videos=N_VIDEOS)
    assert not demo_dataset_complete(demo.root, seed=SEED + 1)

    ds = DemoDataset.at(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(synthetic, "_write_plan", _fake_writer(calls, fail_at=5))
    with pytest.raises(RuntimeError, match="encoder crashed"):
        generate_demo_dataset(tmp_path, n_videos=12, seed=1)
    assert len(calls) == 5 and not ds.manifest.exists()
    assert not demo_dataset_complete(tmp_path)

    monkeypatch.setattr(synthetic, "_write_plan", _fake_writer([]))  # also asserts the old MANIFEST is gone
    generate_demo_dataset(tmp_path, n_videos=12, seed=1)
    generate_demo_dataset(tmp_path, n_videos=12, seed=1)
    assert demo_dataset_complete(tmp_path)
    next(ds.videos_dir.iterdir()).unlink()
    assert not demo_dataset_complete(tmp_path)
    ds.manifest.write_text("{truncated")
    assert not demo_dataset_complete(tmp_path)
    assert not demo_dataset_complete(tmp_path / "nothing-here")


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".avi", ".asf", ".wmv"])
def test_write_clip_deterministic_per_container(tmp_path: Path, ext: str) -> None:
    args: dict[str, Any] = {"classes": ["elephant", "bird"], "seed": 7, "width": 160, "height": 90, "fps": 8}
    args["seconds"] = 1.5
    write_clip(tmp_path / f"a{ext}", **args)
    write_clip(tmp_path / f"b{ext}", **args)
    assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    frames, _ = _decode(tmp_path / f"a{ext}")
    assert len(frames) == 12 and frames[0].shape == (90, 160, 3)
    write_clip(tmp_path / f"c{ext}", **{**args, "seed": 8})
    assert (tmp_path / f"c{ext}").read_bytes() != (tmp_path / f"a{ext}").read_bytes()


def test_write_clip_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown classes"):
        write_clip(tmp_path / "x.mp4", classes=["unicorn"], seed=0, width=64, height=64, fps=4, seconds=1)
    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "x.mp4", classes=[], seed=0, width=65, height=64, fps=4, seconds=1)
    with pytest.raises(ValueError, match="codec"):
        write_clip(tmp_path / "x.xyz", classes=[], seed=0, width=64, height=64, fps=4, seconds=1)
    assert not list(tmp_path.iterdir())


def test_static_clip_has_no_motion(tmp_path: Path) -> None:
    write_static_clip(tmp_path / "s.mp4", width=96, height=64, fps=5, seconds=2, color=(200, 40, 40))
    frames, _ = _decode(tmp_path / "s.mp4")
    assert len(frames) == 10
    stack = np.stack(frames).astype(int)
    assert np.abs(stack - stack[0]).max() == 0
    assert np.abs(stack[0].mean(axis=(0, 1)) - (200, 40, 40)).max() < 6


@pytest.mark.parametrize("cls", [c for c in CLASS_NAMES if c != BLANK])
def test_each_animal_is_visible_in_most_frames(cls: str) -> None:
    """Same seed with and without the animal: the difference is the animal, which must be on screen."""
    kw: dict[str, Any] = {"seed": 5, "width": 320, "height": 180, "fps": 4, "n_frames": 24, "night": False}
    empty = np.stack(list(synthetic_scene._render([], **kw))).astype(int)
    with_animal = np.stack(list(synthetic_scene._render([cls], **kw))).astype(int)
    changed = (np.abs(with_animal - empty).max(axis=-1) > 10).sum(axis=(1, 2))  # pixels per frame
    assert (changed >= 30).mean() >= 0.8, changed


def test_classes_differ_in_appearance() -> None:
    """Mean colour and silhouette area of each animal sprite: no two classes look alike on both."""
    looks = {}
    for cls, design in synthetic_scene._DESIGNS.items():
        rng = np.random.default_rng(0)
        colors = {"body": synthetic_scene._rgb(design.color), "head": synthetic_scene._rgb(design.head_color),
                  "pattern": synthetic_scene._rgb(design.pattern_color)}  # fmt: skip
        img, mask = synthetic_scene._sprite(design, design.size * 180, 0, int(rng.integers(100)), colors)
        looks[cls] = np.array([*img[mask > 0].mean(axis=0), np.sqrt(mask.sum())])
    names = list(looks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(looks[a] - looks[b]).max() > 8, (a, b, looks[a], looks[b])
    assert set(names) == set(CLASS_NAMES) - {BLANK}
