"""Catalog: competition CSVs → rows with splits, stratified folds, partitions; missing files kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jungletrap.catalog import InputError, assign_folds, build_catalog, check_inputs, read_competition_csv
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
    on_disk = {p.name: p.stat() for p in (tiny_dataset / "videos").iterdir()}
    assert catalog["size_bytes"].tolist() == [on_disk[f].st_size for f in catalog[FILENAME]]
    assert catalog["stamp"].tolist() == [f"{on_disk[f].st_size}:{on_disk[f].st_mtime!r}" for f in catalog[FILENAME]]
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


def _sizes_parts(parts: np.ndarray, sizes: list[int]) -> list[int]:
    return [int(np.maximum(np.asarray(sizes)[parts == p], 0).sum()) for p in np.unique(parts)]


def test_partitions_balanced_by_bytes_bounded_by_count_and_contiguous() -> None:
    from jungletrap.catalog import assign_partitions

    mib = 2**20
    sizes = [100 * mib, 100 * mib, 100 * mib, 600 * mib, 10 * mib, -1, 10 * mib, 10 * mib, 10 * mib, 10 * mib]
    parts = assign_partitions(np.array(sizes), videos_per_partition=3, partition_bytes=256 * mib)
    assert parts.tolist() == [0, 0, 1, 2, 3, 3, 3, 4, 4, 4]  # bytes close 0 and 1, the big clip alone, count 3
    assert (np.diff(parts) >= 0).all() and set(np.diff(parts).tolist()) <= {0, 1}
    assert max(_sizes_parts(parts[parts != 2], [s for s, p in zip(sizes, parts, strict=True) if p != 2])) <= 256 * mib
    for off in (0, None):
        by_count = assign_partitions(np.array(sizes), videos_per_partition=4, partition_bytes=off)
        assert by_count.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    again = assign_partitions(np.array(sizes), videos_per_partition=3, partition_bytes=256 * mib)
    assert np.array_equal(parts, again)


def _write_csvs(root: Path, train: list[str], test: list[str]) -> DataConfig:
    rng = np.random.default_rng(0)
    for name, files in (("train_labels.csv", train), ("submission_format.csv", test)):
        frame = pd.DataFrame(rng.integers(0, 2, (len(files), len(CLASS_NAMES))), columns=list(CLASS_NAMES))
        frame.insert(0, FILENAME, files)
        frame.to_csv(root / name, index=False)
    return DataConfig(videos=str(root / "clips"), labels=str(root / "train_labels.csv"),
                      submission_format=str(root / "submission_format.csv"))


def test_nested_layout_resolves_filenames_and_keeps_missing_rows(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    for rel, size in {"a.mp4": 10, "part 1/b c.mp4": 20, "part 2/deep/d.mp4": 30, "x/dup.mp4": 1, "y/dup.mp4": 2,
                      "part 1/e.mp4": 40}.items():
        (clips / rel).parent.mkdir(parents=True, exist_ok=True)
        (clips / rel).write_bytes(b"v" * size)
    train = ["a.mp4", "b c.mp4", "d.mp4", "dup.mp4", "gone.mp4"]
    test = ["part 1/e.mp4", "part 2/e.mp4"]
    catalog = build_catalog(_write_csvs(tmp_path, train, test), CatalogConfig(n_folds=2), seed=0).set_index(FILENAME)
    assert list(catalog.index) == train + test
    assert catalog.loc["b c.mp4", "path"] == str(clips / "part 1" / "b c.mp4")
    assert catalog.loc["d.mp4", "size_bytes"] == 30 and catalog.loc["part 1/e.mp4", "size_bytes"] == 40
    for missing in ("gone.mp4", "dup.mp4", "part 2/e.mp4"):  # absent, ambiguous, or wrong folder: error rows later
        assert catalog.loc[missing, "size_bytes"] == -1
        assert catalog.loc[missing, "path"] == str(clips / missing)


def test_catalog_lists_the_videos_root_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.local import LocalFileSystem

    clips = tmp_path / "clips"
    clips.mkdir()
    names = [f"c{i:03d}.mp4" for i in range(40)]
    for name in names:
        (clips / name).write_bytes(b"v")
    calls: list[str] = []
    real_find = LocalFileSystem.find

    def find(self: LocalFileSystem, path: str, **kwargs: object) -> object:
        calls.append(path)
        return real_find(self, path, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "find", find)
    catalog = build_catalog(_write_csvs(tmp_path, names[:30], names[30:]), CatalogConfig(n_folds=2), seed=0)
    assert calls == [str(clips)] and (catalog["size_bytes"] == 1).all()  # sizes from the one listing


def test_micro_variant_is_selected_by_config(tmp_path: Path) -> None:
    for variant, size in (("full", 1000), ("micro", 10)):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "a.mp4").write_bytes(b"v" * size)
        (tmp_path / variant / "b.mp4").write_bytes(b"v" * size)
    data = _write_csvs(tmp_path, ["a.mp4", "b.mp4"], []).model_copy(update={"videos": str(tmp_path / "{variant}")})
    full = build_catalog(data, CatalogConfig(n_folds=2), seed=0)
    micro = build_catalog(data.model_copy(update={"variant": "micro"}), CatalogConfig(n_folds=2), seed=0)
    assert full["size_bytes"].tolist() == [1000, 1000] and micro["size_bytes"].tolist() == [10, 10]
    assert micro["path"].iloc[0] == str(tmp_path / "micro" / "a.mp4")


# ---- inputs cross-checked before any work ---------------------------------------------------------------------


def _set(root: Path, names: list[str], *, labelled: bool) -> Path:
    """A competition CSV for ``names``: 0/1 labels, or the submission format's 0.5."""
    frame = pd.DataFrame(np.eye(len(names), len(CLASS_NAMES), dtype=int), columns=list(CLASS_NAMES))
    if not labelled:
        frame = frame.astype(float) * 0 + 0.5
    frame.insert(0, FILENAME, names)
    frame.to_csv(root, index=False)
    return root


def _checked(tmp_path: Path, **files: Path) -> DataConfig:
    base = {"labels": _set(tmp_path / "train.csv", ["a.mp4", "b.mp4"], labelled=True),
            "submission_format": _set(tmp_path / "format.csv", ["c.mp4", "d.mp4"], labelled=False),
            "test_labels": _set(tmp_path / "test.csv", ["d.mp4", "c.mp4"], labelled=True)}
    return DataConfig(videos=str(tmp_path / "clips"), **{k: str(v) for k, v in {**base, **files}.items()})


def test_matching_inputs_pass_the_check(tmp_path: Path) -> None:
    train, fmt = check_inputs(_checked(tmp_path))  # test labels may list the clips in another order
    assert list(train[FILENAME]) == ["a.mp4", "b.mp4"] and list(fmt[FILENAME]) == ["c.mp4", "d.mp4"]


@pytest.mark.parametrize(("kind", "needle"), [
    ("other set", "rows are not those of"),
    ("one clip short", "1 of its clips missing (e.g. ['d.mp4'])"),
    ("columns", "missing ['hog'], unexpected ['zebra']"),
    ("column order", "another order"),
    ("value", "label 'bird' of 'c.mp4' is 2"),
    ("empty", "not a readable CSV"),
    ("absent", "file not found"),
])
def test_test_labels_that_do_not_fit_name_the_file(tmp_path: Path, kind: str, needle: str) -> None:
    bad = tmp_path / "bad test labels.csv"
    if kind == "other set":
        _set(bad, ["x.mp4", "y.mp4"], labelled=True)
    elif kind == "one clip short":
        _set(bad, ["c.mp4"], labelled=True)
    elif kind in ("columns", "column order", "value"):
        frame = pd.read_csv(_set(bad, ["c.mp4", "d.mp4"], labelled=True))
        if kind == "columns":
            frame = frame.rename(columns={"hog": "zebra"})
        elif kind == "column order":
            frame = frame[[FILENAME, *reversed(CLASS_NAMES)]]
        else:
            frame.loc[0, "bird"] = 2
        frame.to_csv(bad, index=False)
    elif kind == "empty":
        bad.write_text("")
    with pytest.raises(InputError) as err:
        check_inputs(_checked(tmp_path, test_labels=bad))
    assert str(err.value).startswith(f"{bad}: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_labels_and_submission_format_are_checked_too(tmp_path: Path) -> None:
    nan_label = tmp_path / "labels with a gap.csv"
    frame = pd.read_csv(_set(nan_label, ["a.mp4", "b.mp4"], labelled=True))
    frame.loc[1, "hog"] = np.nan
    frame.to_csv(nan_label, index=False)
    with pytest.raises(InputError, match=f"^{nan_label}: label 'hog' of 'b.mp4' is nan,"):
        check_inputs(_checked(tmp_path, labels=nan_label))
    overlapping = _set(tmp_path / "overlap.csv", ["b.mp4", "c.mp4"], labelled=False)
    with pytest.raises(InputError, match="1 clips are also in"):
        check_inputs(_checked(tmp_path, submission_format=overlapping, test_labels=overlapping))
    wrong = tmp_path / "format.tsv"
    pd.read_csv(_set(wrong, ["c.mp4", "d.mp4"], labelled=False)).to_csv(wrong, sep="\t", index=False)
    with pytest.raises(InputError, match=f"^{wrong}: columns must be"):
        check_inputs(_checked(tmp_path, submission_format=wrong))


@pytest.mark.parametrize("command", [["catalog"], ["run"]])
def test_cli_stops_with_exit_2_before_any_work(tiny_dataset: Path, tmp_path: Path, command: list[str]) -> None:
    """conf/demo.yaml's situation: videos, labels and format of one set, test labels of another."""
    import subprocess
    import sys

    import yaml

    from .conftest import REPO, write_tiny_config

    config = write_tiny_config(tmp_path / "mixed.yaml", tiny_dataset, run_root=tmp_path / "runs")
    other = _set(tmp_path / "other_test_labels.csv", ["x.mp4", "y.mp4"], labelled=True)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["test_labels"] = str(other)
    config.write_text(yaml.safe_dump(cfg))
    cli = str(Path(sys.executable).parent / "jungletrap")
    proc = subprocess.run([cli, *command, "--config", str(config)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    test_clips = sorted(pd.read_csv(tiny_dataset / "submission_format.csv")[FILENAME])
    assert proc.stderr.strip().splitlines() == [
        f"error: {other}: rows are not those of {tiny_dataset / 'submission_format.csv'}: {len(test_clips)} of its "
        f"clips missing (e.g. {test_clips[:3]}), 2 not in it (e.g. ['x.mp4', 'y.mp4'])"]
    assert "dask dashboard" not in proc.stdout and not (tmp_path / "runs").exists()  # no cluster, no run dir
