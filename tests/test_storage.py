"""Parquet parts as written by every stage: float columns byte-stream-split without a dictionary, values exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jungletrap.storage import write_parquet_atomic


def test_float_columns_are_byte_stream_split_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.standard_normal(3 * 5 * 8).astype(np.float16)
    embedding = pa.ListArray.from_arrays(pa.array(np.array([0, 40, 80, 120], np.int32)), pa.array(frames))
    table = pa.table({"video_id": ["a", "b", "a"], "embedding": embedding,
                      "motion_mean": pa.array(rng.random(3).astype(np.float32)), "n_frames": [5, 5, 5]})
    path = tmp_path / "part-00000.parquet"
    write_parquet_atomic(table, path)

    assert pq.read_table(path).equals(table)
    columns = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: set(columns.column(i).encodings)
                 for i in range(columns.num_columns)}
    for name in ("embedding.list.element", "motion_mean"):
        assert "BYTE_STREAM_SPLIT" in encodings[name], encodings
        assert not encodings[name] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}, encodings
    assert encodings["video_id"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}, encodings
