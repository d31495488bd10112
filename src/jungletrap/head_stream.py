"""The head's rows streamed from the run's Parquet parts, in bounded memory (a torch ``IterableDataset``).

``embeddings/<backbone>/part-*.parquet`` hold each clip's T×D frame embeddings; ``features/part-*.parquet`` (same
part names, same clips) hold the metadata columns. A :class:`ClipStream` serves any subset of clips (a fold's fit,
stopping or held-out rows, the test clips, a predict run's clips) by reading the parts one Arrow batch of
``READ_ROWS`` rows at a time and keeping the rows it serves. Unshuffled, rows come in part order (the order of
``video_ids``/``labels``); shuffled (training), the part order is a seeded permutation per epoch and rows pass
through a seeded shuffle buffer of ``shuffle_buffer`` clips, as in ``torch.utils.data`` / WebDataset pipelines.
The small per-clip metadata columns are read once (:class:`PartIndex`); only the embeddings are streamed.

Memory bound of a stream, whatever the number of clips N: one embedding row group being read (an embed part,
``catalog.videos_per_partition`` clips at most) + ``shuffle_buffer`` clips x ``max_frames`` x D float16 + one
batch padded to float32 (batch x ``max_frames`` x D x 4 bytes). Per-clip bookkeeping (ids, keep flags, labels, the
metadata columns) is O(N) but ~400 bytes a clip: ~80 MB at 200,000 clips, against ~23 GB of float16 embeddings.

Batching is done here, not by a ``DataLoader``: Dask's worker processes are daemonic, so loader worker processes
cannot start there, and collating per clip would only add copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset

from jungletrap.embed import read_embedding_meta
from jungletrap.feature_fit import RELATIVE_FEATURES
from jungletrap.features import embedding_parts
from jungletrap.head import Batch, pad_frames, select_frames
from jungletrap.schema import EMBEDDING, PIXEL_COLUMNS, VIDEO_ID
from jungletrap.storage import RunPath, is_remote, read_table
from jungletrap.udfs.features import CONTAINER_FEATURES

__all__ = ["META_FEATURES", "READ_ROWS", "ClipStream", "HeadPart", "MetaScaler", "PartIndex", "fit_meta_scaler"]

META_FEATURES: tuple[str, ...] = (*CONTAINER_FEATURES, *PIXEL_COLUMNS, *RELATIVE_FEATURES)
_LOG_COLUMNS = ("size_bytes", "bit_rate", "bytes_per_second", "bytes_per_pixel", "declared_frames",
                "decoded_frames", "width", "height", *RELATIVE_FEATURES)
#: Rows per Arrow batch read from an embedding part.
READ_ROWS = 64


@dataclass
class MetaScaler:
    """log1p on size-like columns, then standardisation fitted on training rows; NaN becomes 0 (the mean)."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, meta: pd.DataFrame) -> MetaScaler:
        x = cls._log(meta)
        return cls(mean={c: float(np.nan_to_num(x[c].mean())) for c in x},
                   std={c: float(x[c].std()) if x[c].std() > 0 else 1.0 for c in x})

    @staticmethod
    def _log(meta: pd.DataFrame) -> pd.DataFrame:
        x = meta[list(META_FEATURES)].astype(np.float64).copy()
        for c in _LOG_COLUMNS:
            x[c] = np.log1p(x[c].clip(lower=0))
        return x

    def transform(self, meta: pd.DataFrame) -> np.ndarray:
        x = self._log(meta)
        z = (x - pd.Series(self.mean)) / pd.Series(self.std)
        return np.nan_to_num(z.to_numpy(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class HeadPart:
    """One embedding part, its feature part and its clips in file order."""

    embeddings: RunPath
    features: RunPath
    video_ids: np.ndarray

    def read_meta(self) -> pd.DataFrame:
        """The part's raw metadata columns, one row per clip in file order (a few KB a clip at most)."""
        meta = read_table(self.features, columns=[VIDEO_ID, *META_FEATURES]).to_pandas().set_index(VIDEO_ID)
        missing = pd.Index(self.video_ids).difference(meta.index)
        if len(missing):
            raise ValueError(f"{self.features}: no feature rows for {len(missing)} clips of {self.embeddings} "
                             f"(e.g. {missing[0]!r}); run the features stage again")
        return meta.loc[self.video_ids]

    def embedding_batches(self, read_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(values, offsets)`` of the embedding column, ``read_rows`` rows at a time (flat float16, row offsets)."""
        with contextlib.ExitStack() as stack:
            source: Any = (stack.enter_context(self.embeddings.open("rb")) if is_remote(self.embeddings)
                           else str(self.embeddings))
            # pre-buffering coalesces reads on an object store; locally it only adds a copy (2x slower)
            reader = stack.enter_context(pq.ParquetFile(source, pre_buffer=is_remote(self.embeddings)))
            for batch in reader.iter_batches(batch_size=read_rows, columns=[EMBEDDING]):
                column = batch.column(0)
                yield column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()


@dataclass(frozen=True)
class PartIndex:
    """Every part of a run (embedding + feature file) with its clip ids and raw metadata; built once per task.

    The metadata (``len(META_FEATURES)`` float64 a clip, ~200 bytes) is read here once: the feature parts are
    thousands of columns wide, and reading a part's footer on every epoch would cost more than the epoch.
    """

    parts: list[HeadPart]
    meta: list[np.ndarray]  # per part: (clips, len(META_FEATURES)) float64, raw, in file order
    embed_dim: int

    @classmethod
    def open(cls, embed_dir: RunPath, features_dir: RunPath) -> PartIndex:
        parts, meta = [], []
        for path in embedding_parts(embed_dir):
            features = features_dir / path.name
            if not features.exists():
                raise FileNotFoundError(f"{features}: missing feature part for {path}; run the features stage")
            ids = read_table(path, columns=[VIDEO_ID]).column(0).to_numpy(zero_copy_only=False).astype(object)
            parts.append(HeadPart(path, features, ids))
            meta.append(parts[-1].read_meta().to_numpy(np.float64))
        return cls(parts, meta, int(read_embedding_meta(parts[0].embeddings)["feature_dim"]))

    def keep(self, video_ids: Iterable[str]) -> list[np.ndarray]:
        """Per part, which of its rows are among ``video_ids`` (a set lookup a clip: pandas' ``isin`` on Arrow
        strings walks them in Python once per part, ~30 ms a part)."""
        wanted = set(video_ids)
        return [np.fromiter((v in wanted for v in p.video_ids), dtype=bool, count=len(p.video_ids))
                for p in self.parts]


def fit_meta_scaler(index: PartIndex, video_ids: Iterable[str]) -> MetaScaler:
    """:class:`MetaScaler` fitted on the clips ``video_ids`` (their metadata rows, gathered part by part)."""
    keep = index.keep(video_ids)
    rows = np.concatenate([m[k] for m, k in zip(index.meta, keep, strict=True)])
    return MetaScaler.fit(pd.DataFrame(rows, columns=list(META_FEATURES)))


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A bounded shuffle: hold ``size`` items, emit a random one as each new one arrives, then the rest shuffled."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ClipStream(IterableDataset):  # type: ignore[type-arg]
    """Some clips of a :class:`PartIndex` as a :class:`jungletrap.head.HeadSource` (see the module docstring).

    ``labels`` (if given) are aligned with ``video_ids``; :attr:`video_ids` and :attr:`labels` give the stream's own
    (part) order, the order of unshuffled batches and of :func:`jungletrap.head.predict_head`'s rows.
    Iterating the dataset itself yields one ``(frames (n, D) float16, meta (M,), row)`` per clip, unshuffled.
    """

    def __init__(self, index: PartIndex, video_ids: Sequence[str], *, scaler: MetaScaler, max_frames: int,
                 labels: np.ndarray | None = None, shuffle_buffer: int = 1024, read_rows: int = READ_ROWS) -> None:
        wanted = pd.Index(video_ids)
        if not wanted.is_unique:
            raise ValueError("ClipStream: video_ids must be unique")
        self._index, self._max_frames = index, max_frames
        self._buffer, self._read_rows = shuffle_buffer, read_rows
        self._keep = index.keep(wanted)
        self._offsets = np.cumsum([0, *[int(k.sum()) for k in self._keep]])
        self._ids = np.concatenate([p.video_ids[k] for p, k in zip(index.parts, self._keep, strict=True)]
                                   + [np.array([], dtype=object)])
        if len(self._ids) != len(wanted):
            missing = wanted.difference(pd.Index(self._ids))
            raise ValueError(f"{len(missing)} clips have no row in the embedding parts of "
                             f"{index.parts[0].embeddings.parent} (e.g. {missing[0]!r})")
        self._labels = None if labels is None else np.asarray(labels, np.float32)[wanted.get_indexer(self._ids)]
        raw = np.concatenate([m[k] for m, k in zip(index.meta, self._keep, strict=True)])
        self._meta = scaler.transform(pd.DataFrame(raw, columns=list(META_FEATURES)))  # (len, M), stream order

    @property
    def video_ids(self) -> np.ndarray:
        return self._ids

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    @property
    def embed_dim(self) -> int:
        return self._index.embed_dim

    @property
    def meta_dim(self) -> int:
        return len(META_FEATURES)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        return self._clips(range(len(self._index.parts)))

    def _clips(self, part_order: Iterable[int]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """``(frames, meta, row)`` of every served clip, parts in ``part_order``, rows in file order."""
        dim = self._index.embed_dim
        for p in part_order:
            keep, part = self._keep[p], self._index.parts[p]
            if not keep.any():
                continue
            rows = np.cumsum(keep) - 1 + self._offsets[p]  # stream row of each kept file row
            start = 0
            for values, offsets in part.embedding_batches(self._read_rows):
                for i in np.flatnonzero(keep[start : start + len(offsets) - 1]):
                    frames = values[offsets[i] : offsets[i + 1]].reshape(-1, dim)
                    row = int(rows[start + i])
                    yield np.array(select_frames(frames, self._max_frames)), self._meta[row], row
                start += len(offsets) - 1

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None) -> Iterator[Batch]:
        """Padded batches; unshuffled in part order, or shuffled by ``shuffle_seed`` (parts, then the buffer)."""
        if shuffle_seed is None:
            clips = self._clips(range(len(self._index.parts)))
        else:
            rng = np.random.default_rng(shuffle_seed)
            clips = _shuffled(self._clips(rng.permutation(len(self._index.parts))), self._buffer, rng)
        for chunk in _chunks(clips, batch_size):
            yield self._collate(chunk)

    def _collate(self, chunk: list[tuple[np.ndarray, np.ndarray, int]]) -> Batch:
        frames, mask = pad_frames([c[0] for c in chunk], max_frames=self._max_frames, dim=self._index.embed_dim)
        meta = np.stack([c[1] for c in chunk])
        rows = np.array([c[2] for c in chunk])
        labels = None if self._labels is None else torch.from_numpy(self._labels[rows])
        return torch.from_numpy(frames), torch.from_numpy(mask), torch.from_numpy(meta), labels
