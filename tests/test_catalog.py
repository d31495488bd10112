"""Catalog: competition CSVs → rows with splits, stratified folds, partitions; missing files kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jungletrap.catalog import assign_folds, build_catalog, read_competition_csv
from jungletrap.config import CatalogConfig, DataConfig
from jungletrap.schema import CLASS_NAMES, FILENAME


def _data(root: Path) -> DataConfig:
    return DataConfig(videos=str(root / "videos"), labels=str(root / "train_labels.csv"),
                      submission_format=str(root / "submission_format.csv"))


def test_catalog_rows_folds_partitions(tiny_dataset: Path) -> None:
    cfg = CatalogConfig(videos_per_partition=7, n_folds=4)
    catalog = build_catalog(_data(tiny_dataset), cfg, seed=0)
    train = pd.read_csv(tiny_dataset / "train_labels.csv")
    test = pd.read_csv(tiny_dataset / "submission_format.csv")
    assert len(catalog) == len(train) + len(test)
    assert catalog["video_id"].is_unique
    tr = catalog[catalog["split"] == "train"]
    assert sorted(tr["fold"].unique()) == [0, 1, 2, 3]
    assert (catalog.loc[catalog["split"] == "test", "fold"] == -1).all()
    assert catalog.groupby("partition").size().max() == 7
    assert (catalog["size_bytes"] > 0).all()
    merged = tr.set_index("video_id")[list(CLASS_NAMES)].loc[train[FILENAME]]
    np.testing.assert_array_equal(merged.to_numpy(), train[list(CLASS_NAMES)].to_numpy())


def test_folds_spread_every_class_with_enough_examples() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random((300, 24)) < np.linspace(0.02, 0.4, 24)).astype(int)
    folds = assign_folds(labels, n_folds=5, seed=3)
    for c in range(24):
        if labels[:, c].sum() >= 5:
            per_fold = [labels[folds == k, c].sum() for k in range(5)]
            assert min(per_fold) >= 1, (c, per_fold)
    assert np.array_equal(folds, assign_folds(labels, n_folds=5, seed=3))


def test_missing_clip_keeps_its_row(tiny_dataset: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(tiny_dataset / "train_labels.csv")
    extra = labels.iloc[:1].copy()
    extra[FILENAME] = "does not exist.mp4"
    path = tmp_path / "labels.csv"
    pd.concat([labels, extra]).to_csv(path, index=False)
    data = _data(tiny_dataset).model_copy(update={"labels": str(path)})
    catalog = build_catalog(data, CatalogConfig(n_folds=3), seed=0)
    row = catalog.set_index("video_id").loc["does not exist.mp4"]
    assert row["size_bytes"] == -1 and row["split"] == "train"


def test_wrong_columns_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({FILENAME: ["a.mp4"], "zebra": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="bad.csv") as err:
        read_competition_csv(path)
    assert "zebra" in str(err.value)


def test_fold_masks_never_let_a_model_see_its_validation_rows() -> None:
    from jungletrap.catalog import fold_masks

    split = np.array(["train"] * 6 + ["test"] * 2)
    folds = np.array([0, 1, 2, 0, 1, 2, -1, -1])
    covered = np.zeros(8, dtype=int)
    for k in range(3):
        fit, valid = fold_masks(split, folds, k)
        assert not (fit & valid).any() and not (fit | valid)[6:].any()
        assert (folds[valid] == k).all() and (folds[fit] != k).all()
        covered += valid
    assert covered[:6].tolist() == [1] * 6  # every training row is validated exactly once
