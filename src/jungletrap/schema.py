"""Column names, class names and artifact schemas: the one place they are spelled.

Every stage imports names from here so that a column is never spelled twice.
"""

from __future__ import annotations

__all__ = [
    "CLASS_NAMES",
    "FILENAME",
    "VIDEO_ID",
    "PATH",
    "SIZE_BYTES",
    "STAMP",
    "SPLIT",
    "FOLD",
    "PARTITION",
    "STATUS",
    "ERROR",
    "WARNING",
    "N_FRAMES",
    "EMBEDDING",
    "STATUS_OK",
    "STATUS_ERROR",
    "SPLIT_TRAIN",
    "SPLIT_TEST",
    "CONTAINER_COLUMNS",
    "PIXEL_COLUMNS",
    "TOP_LABEL",
]

#: The 24 Pri-matrix Factorization classes, in the competition's column order.
CLASS_NAMES: tuple[str, ...] = (
    "bird",
    "blank",
    "cattle",
    "chimpanzee",
    "elephant",
    "forest buffalo",
    "gorilla",
    "hippopotamus",
    "human",
    "hyena",
    "large ungulate",
    "leopard",
    "lion",
    "other (non-primate)",
    "other (primate)",
    "pangolin",
    "porcupine",
    "reptile",
    "rodent",
    "small antelope",
    "small cat",
    "wild dog",
    "duiker",
    "hog",
)

FILENAME = "filename"  # competition CSVs: path relative to the videos root
VIDEO_ID = "video_id"  # our key: equal to the competition filename
PATH = "path"  # absolute path or URL a worker opens
SIZE_BYTES = "size_bytes"
STAMP = "stamp"  # the clip file's size and version (mtime, or ETag on an object store): a replaced file changes it
SPLIT = "split"
FOLD = "fold"  # -1 for test rows
PARTITION = "partition"  # which embed partition a catalog row belongs to
STATUS = "status"
ERROR = "error"
WARNING = "warning"  # an ``ok`` clip that lost real frames (truncated or partly corrupt file): why
N_FRAMES = "n_frames"  # real (not padded) sampled frames
EMBEDDING = "embedding"  # flattened n_frames x D
TOP_LABEL = "top_label"

STATUS_OK = "ok"
STATUS_ERROR = "error"
SPLIT_TRAIN = "train"
SPLIT_TEST = "test"

#: Container facts read by the decoder for every clip (see :class:`jungletrap.video.ClipInfo`).
CONTAINER_COLUMNS: tuple[str, ...] = (
    "codec",
    "width",
    "height",
    "fps",
    "duration_s",
    "declared_frames",
    "decoded_frames",
    "bit_rate",
    "has_audio",
)

#: Pixel and motion statistics computed on the sampled frames inside the embed UDF.
PIXEL_COLUMNS: tuple[str, ...] = (
    "brightness_mean",
    "saturation_mean",
    "motion_mean",
    "motion_max",
    "motion_p50",
    "motion_p90",
    "motion_frac",
)
