"""The head's fold task and its streamed inputs: same predictions as one in-memory pass, bounded memory as the
data grows, early stopping that never sees the held-out fold, and what the task leaves in a worker's profile."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dask.sizeof import sizeof
from distributed import Client, LocalCluster

from jungletrap.config import HeadConfig
from jungletrap.features import read_embedding_part
from jungletrap.head import FrameHead, HeadData, build_head, fit_head, pad_frames, predict_head
from jungletrap.head_stream import META_FEATURES, ClipStream, PartIndex, _shuffled, fit_meta_scaler
from jungletrap.schema import CLASS_NAMES, EMBEDDING, FOLD, SPLIT, VIDEO_ID
from jungletrap.stopping import stopping_mask
from jungletrap.train_head import predict_head_models, train_head_fold

from .conftest import REPO, write_head_run

N_TRAIN, N_TEST, N_FOLDS, D, T = 45, 15, 3, 16, 6


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """60 clips in 5 parts of 12: catalog, embedding parts (the embed stage's schema) and feature parts."""
    return write_head_run(tmp_path_factory.mktemp("head_run"), n_train=N_TRAIN, n_test=N_TEST, dim=D,
                          max_frames=T, clips_per_part=12, n_folds=N_FOLDS)


def _cfg(**kw: object) -> HeadConfig:
    return HeadConfig.model_validate({"hidden": 8, "max_frames": T, "epochs": 3, "patience": 2, "batch_size": 8,
                                      "shuffle_buffer": 10, **kw})


def _in_memory(embed_dir: Path, features_dir: Path, ids: np.ndarray, stream: ClipStream) -> HeadData:
    """One pass over every part, held whole (the pre-streaming way), rows in ``ids`` order."""
    frame = pd.concat([read_embedding_part(p) for p in sorted(embed_dir.glob("part-*.parquet"))]).set_index(VIDEO_ID)
    meta = pd.concat([pd.read_parquet(p) for p in sorted(features_dir.glob("part-*.parquet"))]).set_index(VIDEO_ID)
    frames, mask = pad_frames([np.asarray(e, np.float32).reshape(-1, D) for e in frame.loc[ids, EMBEDDING]],
                              max_frames=T, dim=D)
    scaler = fit_meta_scaler(PartIndex.open(embed_dir, features_dir), ids)
    return HeadData(frames, mask, scaler.transform(meta.loc[ids, list(META_FEATURES)]), stream.labels)


def test_streamed_rows_give_the_predictions_of_one_in_memory_pass(head_run: tuple[Path, Path, Path]) -> None:
    catalog_path, embed_dir, features_dir = head_run
    catalog = pd.read_parquet(catalog_path)
    rows = catalog.sample(frac=0.6, random_state=1)  # any subset, in any order
    index = PartIndex.open(embed_dir, features_dir)
    scaler = fit_meta_scaler(index, rows[VIDEO_ID])
    stream = ClipStream(index, rows[VIDEO_ID].tolist(), labels=rows[list(CLASS_NAMES)].to_numpy(), scaler=scaler,
                        max_frames=T, read_rows=5)
    assert sorted(stream.video_ids) == sorted(rows[VIDEO_ID]) and list(stream.video_ids) == sorted(stream.video_ids)
    assert stream.labels is not None
    np.testing.assert_array_equal(stream.labels, rows.set_index(VIDEO_ID).loc[stream.video_ids, list(CLASS_NAMES)])
    memory = _in_memory(embed_dir, features_dir, stream.video_ids, stream)
    assert memory.mask.sum(axis=1).min() == 0 and memory.mask.all(axis=1).any()  # empty and subsampled clips
    torch.manual_seed(0)
    model = FrameHead(embed_dim=D, meta_dim=len(META_FEATURES), n_classes=len(CLASS_NAMES), hidden=8).eval()
    torch.nn.init.normal_(model.classifier.weight)  # the zero init would hide the frames
    streamed = predict_head(model, stream, batch_size=7)
    assert np.array_equal(streamed, predict_head(model, memory, batch_size=7))
    # training on the stream unshuffled equals training on the same rows in memory, in the same order
    fits = [fit_head(src, src, cfg=_cfg(), seed=0) for src in (_Unshuffled(stream), _Unshuffled(memory))]
    assert all(torch.equal(fits[0].state_dict[k], fits[1].state_dict[k]) for k in fits[0].state_dict)


class _Unshuffled:
    """A source whose epochs all come in its fixed order (to compare two sources' training step by step)."""

    def __init__(self, source: ClipStream | HeadData) -> None:
        self.source, self.embed_dim, self.meta_dim = source, source.embed_dim, source.meta_dim
        self.labels = source.labels

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None):  # type: ignore[no-untyped-def]
        return self.source.batches(batch_size)


def test_shuffled_epochs_serve_every_row_once_in_a_seeded_order(head_run: tuple[Path, Path, Path]) -> None:
    catalog_path, embed_dir, features_dir = head_run
    ids = pd.read_parquet(catalog_path)[VIDEO_ID].tolist()
    index = PartIndex.open(embed_dir, features_dir)
    stream = ClipStream(index, ids, labels=np.eye(len(ids), dtype=np.float32), scaler=fit_meta_scaler(index, ids),
                        max_frames=T, shuffle_buffer=10)

    def order(seed: int) -> list[int]:  # one-hot labels name the row each batch entry came from
        return [int(i) for b in stream.batches(8, shuffle_seed=seed) for i in b[3].argmax(dim=1)]

    first = order(1)
    assert sorted(first) == list(range(len(ids))) and first == order(1) and first != order(2)
    assert first != sorted(first)
    # the buffer is bounded: an item cannot leave more than `size` places before it arrives
    out = list(_shuffled(iter(range(200)), 10, np.random.default_rng(0)))
    assert sorted(out) == list(range(200)) and all(item <= pos + 10 for pos, item in enumerate(out))


def test_stopping_split_is_by_clip_within_the_fit_rows_and_stratified() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    ids = np.array([f"c{i}" for i in range(n)], dtype=object)
    labels = (rng.random((n, 5)) < [0.01, 0.05, 0.2, 0.4, 0.5]).astype(np.float32)
    fit = rng.random(n) < 0.8
    stop = stopping_mask(ids, labels, fit, fraction=0.125, seed=3)
    assert not (stop & ~fit).any() and abs(stop.sum() / fit.sum() - 0.125) < 0.01
    assert labels[stop, 0].sum() >= 1  # the rarest class reaches the stopping rows
    perm = rng.permutation(n)  # another row order (XGBoost's feature parts vs the catalog): the same clips
    assert set(ids[perm][stopping_mask(ids[perm], labels[perm], fit[perm], fraction=0.125, seed=3)]) == set(ids[stop])
    assert set(ids[stopping_mask(ids, labels, fit, fraction=0.125, seed=4)]) != set(ids[stop])
    tiny = np.zeros(n, bool)
    tiny[:3] = True
    assert stopping_mask(ids, labels, tiny, fraction=0.125, seed=0).sum() == 1


@pytest.mark.parametrize("refit", [False, True])
def test_held_out_labels_never_reach_the_fold_model(head_run: tuple[Path, Path, Path], tmp_path: Path,
                                                     refit: bool) -> None:
    """The fold stops early on its inner split: flipping every held-out label changes none of its predictions.

    Before, the head stopped on the held-out fold itself, so its labels picked the epoch whose model scored it.
    The refit (on every training-fold row) must not take the held-out rows in either.
    """
    catalog_path, embed_dir, features_dir = head_run
    catalog = pd.read_parquet(catalog_path)
    flipped = catalog.copy()
    held = (flipped[SPLIT] == "train") & (flipped[FOLD] == 0)
    flipped.loc[held, list(CLASS_NAMES)] = 1 - flipped.loc[held, list(CLASS_NAMES)]
    flipped.to_parquet(tmp_path / "flipped.parquet")
    cfg = _cfg(epochs=8, patience=2, lr=0.01)
    results = [train_head_fold(path, embed_dir, features_dir, tmp_path / name, 0, cfg, 0, stopping_fraction=0.2,
                               refit=refit)
               for path, name in ((catalog_path, "models"), (tmp_path / "flipped.parquet", "flipped"))]
    first, again = results
    assert len(first["oof"]) == N_TRAIN // N_FOLDS and len(first["test"]) == N_TEST
    assert first["n_fit"] + first["n_stopping"] == N_TRAIN - N_TRAIN // N_FOLDS and 3 <= first["n_stopping"] <= 9
    pd.testing.assert_frame_equal(first["oof"], again["oof"])
    assert first["oof_logloss"] != again["oof_logloss"]  # scored on the (flipped) held-out labels
    # predict streams the same rows through the saved fold model: the task's test predictions again
    test = predict_head_models(tmp_path / "models", embed_dir, features_dir).loc[first["test"][VIDEO_ID]]
    np.testing.assert_allclose(test.to_numpy(), first["test"][list(CLASS_NAMES)].to_numpy(), rtol=1e-6)
    spec = json.loads((tmp_path / "models" / "fold0.json").read_text(encoding="utf-8"))
    assert spec["max_frames"] == T and build_head(spec["init_kwargs"]).init_kwargs["embed_dim"] == D


@pytest.mark.parametrize("scale", [False, True])
def test_refit_trains_on_every_training_fold_row_for_the_chosen_epochs(head_run: tuple[Path, Path, Path],
                                                                       tmp_path: Path, scale: bool) -> None:
    """The saved fold model is a head fitted on fit + stopping rows (scaler too) for the stopping run's epoch count
    (scaled by 1 / (1 - fraction) with ``scale``): rebuilt here from those rows, it predicts the same."""
    catalog_path, embed_dir, features_dir = head_run
    cfg = _cfg(epochs=6, patience=2, lr=0.01)
    result = train_head_fold(catalog_path, embed_dir, features_dir, tmp_path / "models", 1, cfg, 0,
                             stopping_fraction=0.2, refit=True, refit_scale=scale)
    assert result["refit"] and result["n_model"] == result["n_fit"] + result["n_stopping"] == N_TRAIN - N_TRAIN // 3
    assert result["epochs"] == (round(result["best_epoch"] / 0.8) if scale else result["best_epoch"])
    catalog = pd.read_parquet(catalog_path)
    train = catalog[(catalog[SPLIT] == "train") & (catalog[FOLD] != 1)]
    index = PartIndex.open(embed_dir, features_dir)
    scaler = fit_meta_scaler(index, train[VIDEO_ID])
    labels = train[list(CLASS_NAMES)].to_numpy(np.float32)

    def stream(ids: list[str], y: np.ndarray | None) -> ClipStream:
        return ClipStream(index, ids, labels=y, scaler=scaler, max_frames=T, shuffle_buffer=cfg.shuffle_buffer)

    fit = fit_head(stream(train[VIDEO_ID].tolist(), labels), None, cfg=cfg, seed=1, class_prior=labels.mean(axis=0),
                   epochs=result["epochs"])
    test = stream(result["test"][VIDEO_ID].tolist(), None)
    np.testing.assert_allclose(predict_head(build_head(fit.init_kwargs, fit.state_dict), test),
                               result["test"][list(CLASS_NAMES)].to_numpy(), rtol=1e-6)
    spec = json.loads((tmp_path / "models" / "fold1.json").read_text(encoding="utf-8"))
    assert spec["scaler"]["mean"] == scaler.mean


_PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from jungletrap.config import HeadConfig
    from jungletrap.train_head import train_head_fold
    run = Path(sys.argv[1])
    cfg = HeadConfig(hidden=16, max_frames=45, epochs=2, patience=1, batch_size=64, shuffle_buffer=64)
    train_head_fold(run / "catalog.parquet", run / "embeddings" / "synthetic", run / "features", run / "models", 0,
                    cfg, 0, refit=True)  # the stopping run and the refit on every training row both stream
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


@pytest.mark.slow
def test_fold_task_peak_memory_does_not_grow_with_the_clips(tmp_path: Path) -> None:
    """A fold task on 500 and on 5,000 clips (45 frames x 256 dims): its peak RSS may not grow by 64 MiB.

    Holding the rows, as the task did before streaming, grows it by ~600 MiB (float32 frames padded twice).
    """
    peaks = []
    for n in (500, 5000):
        run = tmp_path / f"n{n}"
        run.mkdir()
        write_head_run(run, n_train=n * 4 // 5, n_test=n // 5, dim=256, max_frames=45, clips_per_part=50)
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(run)], capture_output=True, text=True,
                             cwd=REPO, check=True)
        peaks.append(int(out.stdout.split()[-1]) / 1024)
    assert peaks[1] - peaks[0] < 64, f"peak RSS {peaks[0]:.0f} MiB at 500 clips, {peaks[1]:.0f} MiB at 5,000"


def test_head_fold_leaves_a_worker_profile_dask_can_size(head_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The profile a stage's performance report collects from each worker must stay measurable by ``sizeof``.

    A fresh worker, not the suite's shared one: the deep stack comes from an import that runs once per process.
    Before the fix, torch's lazy ``torch._dynamo`` import ran in the task's thread and left a ~100-frame stack in
    the profile; sizing it raised RecursionError, which the demo showed as two (one per worker) "Sizeof calculation
    for object of type 'dict' failed" warnings at the end of the train stage.
    """
    catalog, embed_dir, features_dir = head_run
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        result = client.submit(train_head_fold, catalog, embed_dir, features_dir, tmp_path / "models", 0,
                               _cfg(epochs=2), 0, pure=False).result()
        worker_profile = client.profile()
    assert result["fold"] == 0 and len(result["oof"]) == N_TRAIN // N_FOLDS and len(result["test"]) == N_TEST
    assert worker_profile["count"] > 0
    assert sizeof(worker_profile) > 0
