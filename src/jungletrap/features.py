"""Features stage: embedding parts → ``features/part-NNNNN.parquet``, one row per video, on the cluster.

A Dask DataFrame is built with ``from_map`` (one partition per embedding part, read on the workers), mapped
through :func:`jungletrap.udfs.features.features_partition` with its declared ``meta``, and written with
``to_parquet``. The stage is cheap next to embedding, so it is recomputed whole when its inputs change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq
from distributed import Client

from jungletrap.config import FeaturesConfig
from jungletrap.embed import read_embedding_meta
from jungletrap.schema import EMBEDDING
from jungletrap.udfs.features import FEATURE_SET_VERSION, features_meta, features_partition

__all__ = ["build_features", "read_embedding_part", "embedding_parts", "FEATURES_DIR"]

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


def embedding_parts(embed_dir: Path) -> list[Path]:
    parts = sorted(embed_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no embedding parts in {embed_dir}: run the embed stage first")
    return parts


def read_embedding_part(path: str) -> pd.DataFrame:
    """Read one embedding part as pandas, each embedding a flat numpy array (zero-copy slices of one buffer)."""
    table = pq.read_table(path)
    frame = table.drop_columns([EMBEDDING]).to_pandas()
    column = table.column(EMBEDDING).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    frame[EMBEDDING] = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    return frame


def build_features(client: Client, embed_dir: Path, out_dir: Path, cfg: FeaturesConfig) -> dict[str, int]:
    """Write the feature table for every embedding part; return row counts."""
    parts = embedding_parts(embed_dir)
    embed_dim = int(read_embedding_meta(parts[0])["feature_dim"])
    meta = features_meta(embed_dim, cfg.pooling)
    embeddings = dd.from_map(read_embedding_part, [str(p) for p in parts], label="read-embeddings",
                             enforce_metadata=False)
    feats = embeddings.map_partitions(
        features_partition, embed_dim=embed_dim, pooling=list(cfg.pooling), meta=meta, enforce_metadata=False
    )
    custom = {"jungletrap": json.dumps({"artifact": "features", "feature_set_version": FEATURE_SET_VERSION,
                                        "embed_dim": embed_dim, "pooling": list(cfg.pooling)})}
    write = feats.to_parquet(
        str(out_dir),
        write_index=False,
        overwrite=True,
        name_function=lambda i: f"part-{i:05d}.parquet",
        custom_metadata=custom,
        compute=False,
    )
    client.compute(write).result()
    n = sum(pq.read_metadata(p).num_rows for p in sorted(out_dir.glob("part-*.parquet")))
    log.info("features: %d rows, %d pooled dims x %s", n, embed_dim, list(cfg.pooling))
    return {"rows": int(n), "columns": len(meta.columns)}
