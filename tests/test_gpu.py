"""The CUDA path: embeddings on a GPU match the CPU's, and LocalCUDACluster workers advertise their GPU.

Skipped, with the reason, where torch sees no CUDA device (CI and the development machines have none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jungletrap.catalog import catalog_from_paths
from jungletrap.cluster import cuda_available, open_client
from jungletrap.config import ClusterConfig

from .conftest import REAL_VIDEOS, real_video_paths

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device; none visible")]


def _settings(device: str):  # noqa: ANN202 - imported lazily so collection never needs CUDA
    from jungletrap.config import EmbedConfig
    from jungletrap.embed import embed_settings

    return embed_settings(EmbedConfig(backbone="efficientnet_lite0", device=device, sample_fps=1, max_seconds=8))


def test_cuda_embeddings_match_cpu() -> None:
    from jungletrap.udfs.embed import embed_partition

    rows = catalog_from_paths(real_video_paths(), REAL_VIDEOS, videos_per_partition=100)
    cpu = embed_partition(rows, settings=_settings("cpu"))
    gpu = embed_partition(rows, settings=_settings("cuda"))
    assert (cpu["status"] == "ok").all() and (gpu["status"] == "ok").all()
    assert cpu["n_frames"].tolist() == gpu["n_frames"].tolist()
    for a, b in zip(cpu["embedding"], gpu["embedding"], strict=True):
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        cos = (a32 @ b32) / (np.linalg.norm(a32) * np.linalg.norm(b32))
        assert cos > 0.99  # bfloat16 autocast on the GPU vs float32 on the CPU


def test_local_cuda_cluster_workers_have_gpus(tmp_path: Path) -> None:
    import torch

    with open_client(ClusterConfig(kind="cuda")) as (client, info):
        assert info.kind == "cuda" and info.gpu
        assert info.n_workers == torch.cuda.device_count()
        assert pd.Series(client.run(lambda: __import__("torch").cuda.is_available())).all()
