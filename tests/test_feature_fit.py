"""Fitted feature transforms: learned from training rows only, applied unchanged to every row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jungletrap.feature_fit import FeatureTransform, apply_feature_transform, fit_feature_transform


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    width = rng.choice([640, 1280], n)
    frame = pd.DataFrame({"width": width, "height": width * 9 // 16})
    frame["size_bytes"] = rng.uniform(1e5, 1e6, n) * (width / 640) ** 2
    frame["bytes_per_second"] = frame["size_bytes"] / 10
    frame["bytes_per_pixel"] = frame["size_bytes"] / (frame["width"] * frame["height"] * 100)
    for d in range(12):
        frame[f"emb_mean_{d:04d}"] = rng.normal(d % 3, 1, n)
    return frame


POOLED = [f"emb_mean_{d:04d}" for d in range(12)]


def _fit(train: pd.DataFrame) -> FeatureTransform:
    return fit_feature_transform(train, pca_columns={"emb_": POOLED}, pca_components=4, max_rows=1000, seed=0)


def test_fit_uses_training_rows_only() -> None:
    table = _table(200, 0)
    is_train = np.arange(200) < 150
    before = _fit(table[is_train])
    changed = table.copy()
    changed.loc[~is_train, POOLED] = 1e6  # wild test rows
    changed.loc[~is_train, "size_bytes"] = 1.0
    after = _fit(changed[is_train])
    assert before == after
    assert _fit(changed) != before  # (fitting on every row would have moved it)


def test_relative_features_divide_by_the_resolution_groups_training_median() -> None:
    train = _table(100, 1)
    transform = _fit(train)
    out = apply_feature_transform(train, transform)
    for width in (640, 1280):
        rows = out[out["width"] == width]
        assert rows["bytes_per_second_rel"].median() == pytest.approx(1.0, rel=1e-5)
    unseen = _table(3, 2).assign(width=320, height=180)
    rel = apply_feature_transform(unseen, transform)["size_bytes_rel"]
    assert np.isfinite(rel).all()  # an unseen resolution falls back to the global training median


def test_pca_columns_and_nan_rows(tmp_path: Path) -> None:
    train = _table(120, 3)
    transform = _fit(train)
    rows = _table(5, 4)
    rows.loc[2, POOLED] = np.nan  # an error row
    out = apply_feature_transform(rows, transform)
    pca = [f"emb_pca_{k:03d}" for k in range(4)]
    assert all(c in out for c in pca)
    assert out.loc[2, pca].isna().all() and out.drop(index=2)[pca].notna().all(axis=None)
    transform.save(tmp_path / "t.json")
    assert FeatureTransform.load(tmp_path / "t.json") == transform


class _NoFullScan(set[str]):
    """A set of training ids that may be asked about single ids but never walked whole."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the fit pass walked every training id for one part: parts x N work, not N")


def test_fit_rows_are_picked_by_lookup_not_a_scan_of_every_id_per_part(tmp_path: Path) -> None:
    """At 200,000 clips ``Series.isin(fit_ids)`` per part (it converts the whole set each call) took the fit
    pass over 15 minutes; the rows must be picked by looking each of a part's ids up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jungletrap.features import _fit_frame
    from jungletrap.schema import VIDEO_ID

    frame = _table(40, seed=0)
    frame.insert(0, VIDEO_ID, [f"v{i:03d}.mp4" for i in range(40)])
    parts = []
    for k in range(4):
        parts.append(tmp_path / f"part-{k:05d}.parquet")
        pq.write_table(pa.Table.from_pandas(frame.iloc[k * 10 : (k + 1) * 10], preserve_index=False), parts[-1])
    fit_ids = _NoFullScan(f"v{i:03d}.mp4" for i in range(0, 40, 2))
    picked = _fit_frame(parts, fit_ids, ["width", "size_bytes"], None)
    assert picked[VIDEO_ID].tolist() == [f"v{i:03d}.mp4" for i in range(0, 40, 2)]
    assert picked["size_bytes"].tolist() == frame["size_bytes"].iloc[::2].tolist()


def test_a_transform_saved_before_one_pca_per_backbone_loads_and_applies_the_same(tmp_path: Path) -> None:
    import json

    transform = _fit(_table(120, 5))
    (pca,) = transform.pca
    legacy = {"group_medians": transform.group_medians, "pca_columns": pca.columns, "pca_mean": pca.mean,
              "pca_components": pca.components}  # models/features.json as runs wrote it before
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    loaded = FeatureTransform.load(tmp_path / "old.json")
    assert loaded == transform and pca.output_names()[0] == "emb_pca_000"
    rows = _table(4, 6)
    pd.testing.assert_frame_equal(apply_feature_transform(rows, loaded), apply_feature_transform(rows, transform))
