"""Features on clips whose truth is known: motion, saturation, bit rate, pooling, error rows as NaN."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from jungletrap.udfs.embed import embed_partition
from jungletrap.udfs.features import features_meta, features_partition, pooled_names

from jungletrap.catalog import catalog_from_paths
from jungletrap.config import EmbedConfig
from jungletrap.embed import embed_settings
from jungletrap.synthetic import write_clip, write_static_clip


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("feature_clips")
    write_static_clip(root / "static.mp4", width=160, height=90, fps=8, seconds=4)
    write_clip(root / "night.mp4", classes=["leopard"], seed=1, width=160, height=90, fps=8, seconds=4, night=True)
    write_clip(root / "day.mp4", classes=["elephant"], seed=2, width=160, height=90, fps=8, seconds=4)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    rows = catalog_from_paths(sorted(root.iterdir()), root, videos_per_partition=10)
    settings = embed_settings(EmbedConfig(backbone="tiny_cnn", sample_fps=2, max_seconds=4, device="cpu"))
    return embed_partition(rows, settings=settings).set_index("video_id", drop=False)


def test_static_clip_has_no_motion_and_moving_clip_has_some(embedded: pd.DataFrame) -> None:
    assert embedded.loc["static.mp4", "motion_mean"] < 1e-3
    assert embedded.loc["static.mp4", "motion_frac"] == 0.0
    assert embedded.loc["day.mp4", "motion_max"] > 10 * max(embedded.loc["static.mp4", "motion_max"], 1e-4)


def test_night_clip_is_grey_and_day_clip_is_coloured(embedded: pd.DataFrame) -> None:
    assert embedded.loc["night.mp4", "saturation_mean"] < 0.05
    assert embedded.loc["day.mp4", "saturation_mean"] > 0.15


def test_bit_rate_is_bytes_times_8_over_duration(embedded: pd.DataFrame) -> None:
    feats = features_partition(embedded.reset_index(drop=True), embed_dim=64, pooling=["mean", "max"])
    row = feats.set_index("video_id").loc["day.mp4"]
    assert row["bytes_per_second"] == pytest.approx(row["size_bytes"] / row["duration_s"], rel=1e-5)
    assert row["bit_rate"] == pytest.approx(row["size_bytes"] * 8 / row["duration_s"], rel=0.05)


def test_pooling_and_error_rows(embedded: pd.DataFrame) -> None:
    frame = embedded.reset_index(drop=True)
    feats = features_partition(frame, embed_dim=64, pooling=["mean", "max", "std"]).set_index("video_id")
    assert list(feats.reset_index().columns) == list(features_meta(64, ["mean", "max", "std"]).columns)
    day = embedded.loc["day.mp4"]
    frames = np.asarray(day["embedding"], np.float32).reshape(day["n_frames"], 64)
    np.testing.assert_allclose(feats.loc["day.mp4", pooled_names(64, ["mean"])].to_numpy(np.float32),
                               frames.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats.loc["day.mp4", pooled_names(64, ["max"])].to_numpy(np.float32),
                               frames.max(axis=0))
    broken = feats.loc["broken.mp4"]
    assert broken["status"] == "error" and "broken.mp4" in broken["error"]
    assert broken[pooled_names(64, ["mean"])].isna().all() and np.isnan(broken["motion_mean"])
    assert broken["size_bytes"] == len(b"not a video at all")
