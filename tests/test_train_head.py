"""The head's fold task on a real worker: what it leaves in the worker's profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.sizeof import sizeof
from distributed import Client, LocalCluster

from jungletrap.catalog import CATALOG_NAME
from jungletrap.config import HeadConfig
from jungletrap.embed import META_KEY
from jungletrap.features import FEATURES_DIR
from jungletrap.schema import CLASS_NAMES, EMBEDDING, FOLD, SPLIT, SPLIT_TEST, SPLIT_TRAIN, VIDEO_ID
from jungletrap.train_head import META_FEATURES, train_head_fold

N_TRAIN, N_TEST, N_FOLDS, D = 30, 10, 3, 16


def _write_inputs(run_dir: Path) -> tuple[Path, Path, Path]:
    """A catalog, one embedding part and a feature table: the files a head fold reads, with random values."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_TEST
    ids = [f"v{i:03d}" for i in range(n)]
    catalog = pd.DataFrame({VIDEO_ID: ids, SPLIT: [SPLIT_TRAIN] * N_TRAIN + [SPLIT_TEST] * N_TEST,
                            FOLD: [i % N_FOLDS for i in range(N_TRAIN)] + [-1] * N_TEST})
    labels = (rng.random((n, len(CLASS_NAMES))) < 0.2).astype(np.float32)
    catalog = pd.concat([catalog, pd.DataFrame(labels, columns=list(CLASS_NAMES))], axis=1)
    catalog.to_parquet(run_dir / CATALOG_NAME)
    embed_dir = run_dir / "embeddings"
    embed_dir.mkdir()
    frames = [rng.normal(size=rng.integers(1, 5) * D).astype(np.float16) for _ in ids]
    table = pa.table({VIDEO_ID: ids, EMBEDDING: pa.array(frames, type=pa.list_(pa.float16()))})
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps({"feature_dim": D})}),
                   embed_dir / "part-00000.parquet")
    features_dir = run_dir / FEATURES_DIR
    features_dir.mkdir()
    meta = pd.DataFrame(rng.random((n, len(META_FEATURES))) * 100, columns=list(META_FEATURES))
    pd.concat([pd.DataFrame({VIDEO_ID: ids}), meta], axis=1).to_parquet(features_dir / "part-00000.parquet")
    return run_dir / CATALOG_NAME, embed_dir, features_dir


def test_head_fold_leaves_a_worker_profile_dask_can_size(tmp_path: Path) -> None:
    """The profile a stage's performance report collects from each worker must stay measurable by ``sizeof``.

    A fresh worker, not the suite's shared one: the deep stack comes from an import that runs once per process.
    Before the fix, torch's lazy ``torch._dynamo`` import ran in the task's thread and left a ~100-frame stack in
    the profile; sizing it raised RecursionError, which the demo showed as two (one per worker) "Sizeof calculation
    for object of type 'dict' failed" warnings at the end of the train stage.
    """
    catalog, embed_dir, features_dir = _write_inputs(tmp_path)
    cfg = HeadConfig.model_validate({"hidden": 8, "max_frames": 4, "epochs": 2, "batch_size": 16})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        result = client.submit(train_head_fold, catalog, embed_dir, features_dir, tmp_path / "models", 0, cfg, 0,
                               pure=False).result()
        worker_profile = client.profile()
    assert result["fold"] == 0 and len(result["oof"]) == N_TRAIN // N_FOLDS and len(result["test"]) == N_TEST
    assert worker_profile["count"] > 0
    assert sizeof(worker_profile) > 0
