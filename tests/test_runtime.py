"""Inference runtimes: OpenVINO agrees with torch on every backbone (real clips), a worker compiles once per
process, ``auto`` picks and falls back as documented, a missing package is a config error, and the pipeline runs
end to end with each runtime, the runtime staying out of every hash."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client
from jungletrap.udfs import embed as embed_udf

from jungletrap.backbones import BACKBONES, build_backbone, get_spec, preprocess
from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.cluster import ClusterInfo
from jungletrap.config import ConfigError, EmbedConfig, load_config
from jungletrap.embed import embed_catalog, embed_settings, part_path, read_embedding_meta
from jungletrap.features import read_embedding_part
from jungletrap.pipeline import StageContext, run_pipeline
from jungletrap.runtimes import compile_backbone, openvino_available, resolve_runtime
from jungletrap.video import read_clip
from jungletrap.weights import RANDOM

from .conftest import REAL_VIDEOS, real_video_paths, write_tiny_config

#: The agreement a runtime must meet to stay out of the result hash (README, Configuration).
MAX_ABS_DIFF, MIN_COSINE = 1e-3, 0.9999
#: ResNet-152's published file is not shipped, so it is compared with its seeded random weights.
OFFLINE = {"resnet152_skip": RANDOM}


@pytest.fixture(scope="module")
def real_frames() -> dict[int, np.ndarray]:
    """Two frames of each real clip (1 fps), letterboxed to each backbone's input size, by size."""
    sizes = {spec.input_size for spec in BACKBONES.values()}
    return {size: np.concatenate([read_clip(p, sample_fps=1.0, max_seconds=2.0, size=size)[0]
                                  for p in real_video_paths()]) for size in sizes}


def _without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where the package is not installed: importing it fails and no spec is found."""
    monkeypatch.setitem(sys.modules, "openvino", None)


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed (no wheel for this platform)")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet152_skip" else n
                                  for n in sorted(BACKBONES)])
def test_openvino_agrees_with_torch_on_the_real_clips(name: str, real_frames: dict[int, np.ndarray]) -> None:
    spec = get_spec(name)
    module = build_backbone(spec, weights=OFFLINE.get(name))
    x = preprocess(torch.from_numpy(real_frames[spec.input_size]), spec)
    torch_out = compile_backbone(module, runtime="torch", device="cpu", input_size=spec.input_size, threads=1)(x)
    openvino = compile_backbone(module, runtime="openvino", device="cpu", input_size=spec.input_size, threads=1)
    ov_out = np.concatenate([openvino(x[:5]), openvino(x[5:])])  # two batch sizes through one compiled model
    assert ov_out.shape == torch_out.shape == (len(x), spec.feature_dim) and ov_out.dtype == np.float32
    assert np.abs(torch_out).max() > 0.1, "features too small for the tolerance to mean anything"
    assert np.abs(ov_out - torch_out).max() <= MAX_ABS_DIFF
    cosine = (ov_out * torch_out).sum(1) / (np.linalg.norm(ov_out, axis=1) * np.linalg.norm(torch_out, axis=1))
    assert cosine.min() >= MIN_COSINE


def test_auto_is_openvino_on_cpu_and_torch_on_gpu() -> None:
    assert resolve_runtime("auto", "cpu") == "openvino"
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    settings = embed_settings(EmbedConfig(backbone="tiny_cnn", runtime="openvino"))
    assert embed_udf.runtime_for(settings, "cuda") == ("openvino", "cpu")  # OpenVINO always runs on the CPU


def test_auto_without_openvino_falls_back_to_torch_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from jungletrap import runtimes

    _without_openvino(monkeypatch)
    monkeypatch.setattr(runtimes, "_fallback_said", False)
    with caplog.at_level(logging.WARNING, logger="jungletrap.runtimes"):
        assert [resolve_runtime("auto", "cpu") for _ in range(3)] == ["torch"] * 3
    assert caplog.text.count("openvino is not installed") == 1


def test_runtime_openvino_without_the_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(overrides=["embed.runtime=openvino"]).embed.runtime == "openvino"
    _without_openvino(monkeypatch)
    with pytest.raises(ConfigError, match=r"embed: .*runtime=openvino needs the openvino package, which is not "):
        load_config(overrides=["embed.runtime=openvino"])
    assert load_config(overrides=["embed.runtime=auto"]).embed.runtime == "auto"


def test_runtime_openvino_with_device_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="runtime=openvino runs on CPU workers"):
        load_config(overrides=["embed.runtime=openvino", "embed.device=cuda"])


def _one_clip_per_partition(tmp_path: Path) -> Path:
    paths = real_video_paths()
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog_from_paths(paths, REAL_VIDEOS, videos_per_partition=1), catalog)
    return catalog


def test_a_worker_compiles_once_and_later_partitions_reuse_it(dask_client: Client, tmp_path: Path) -> None:
    """Six partitions on two workers: each worker builds and compiles the model once, not once a partition.
    (input_size 72: a model no other test built, so each worker's first partition must build it.)"""
    cfg = EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=3.0, runtime="openvino", input_size=72)
    before = dask_client.run(embed_udf.model_builds)
    counts = embed_catalog(dask_client, _one_clip_per_partition(tmp_path), tmp_path / "emb", cfg)
    assert counts["partitions"] == 6 and counts["embedded"] == 6
    built = {w: n - before[w] for w, n in dask_client.run(embed_udf.model_builds).items()}
    assert set(built.values()) <= {0, 1} and sum(built.values()) >= 1, built
    assert {read_embedding_meta(part_path(tmp_path / "emb", p))["runtime"] for p in range(6)} == {"openvino"}


def test_a_process_builds_once_for_two_partitions() -> None:
    settings = embed_settings(EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=2.0,
                                          runtime="openvino", input_size=80))
    rows = pd.DataFrame({"video_id": ["a", "b"], "path": [str(p) for p in real_video_paths()[:2]],
                         "size_bytes": [1, 1]})
    before = embed_udf.model_builds()
    first = embed_udf.embed_partition(rows, settings=settings)
    assert embed_udf.model_builds() == before + 1
    second = embed_udf.embed_partition(rows.iloc[::-1], settings=settings)
    assert embed_udf.model_builds() == before + 1
    assert (first["status"] == "ok").all() and (second["status"] == "ok").all()


def _embeddings(run_dir: Path) -> pd.Series:
    parts = sorted((run_dir / "embeddings" / "tiny_cnn").glob("part-*.parquet"))
    frame = pd.concat([read_embedding_part(str(p)) for p in parts]).set_index("video_id")
    return frame.loc[frame["status"] == "ok", "embedding"].sort_index()


def _run(client: Client, config: Path, runtime: str) -> tuple[Path, dict[str, str]]:
    cfg = load_config(config, [f"embed.runtime={runtime}"])
    info = ClusterInfo("cpu", None, 2, False)
    run_pipeline(StageContext(client, cfg, cfg.run_dir(), info))
    manifest = json.loads((Path(cfg.run_dir()) / "manifest.json").read_text())
    return Path(cfg.run_dir()), {s: r["status"] for s, r in manifest["stages"].items()}


@pytest.mark.slow
def test_pipeline_end_to_end_with_each_runtime(dask_client: Client, tiny_dataset: Path, tmp_path: Path) -> None:
    """Both runtimes run every stage; their embeddings agree; and switching the runtime of a finished run
    re-runs nothing (it is a performance key: not in the stage hashes nor in the parts' result hash)."""
    runs = {}
    for runtime in ("torch", "openvino"):
        config = write_tiny_config(tmp_path / f"{runtime}.yaml", tiny_dataset, run_root=tmp_path / "runs",
                                   name=runtime)
        run_dir, statuses = _run(dask_client, config, runtime)
        assert set(statuses.values()) == {"done"}, statuses
        assert (run_dir / "submission.csv").is_file()
        part = next((run_dir / "embeddings" / "tiny_cnn").glob("part-*.parquet"))
        assert read_embedding_meta(part)["runtime"] == runtime
        runs[runtime] = (config, run_dir)
    torch_emb, ov_emb = _embeddings(runs["torch"][1]), _embeddings(runs["openvino"][1])
    assert list(torch_emb.index) == list(ov_emb.index) and len(torch_emb) > 50
    for a, b in zip(torch_emb, ov_emb, strict=True):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3, rtol=2e-3)
    before = {p: p.stat().st_mtime_ns for p in runs["torch"][1].rglob("*.parquet")}
    _, statuses = _run(dask_client, runs["torch"][0], "openvino")
    assert set(statuses.values()) == {"done"}
    assert {p: p.stat().st_mtime_ns for p in runs["torch"][1].rglob("*.parquet")} == before


def test_parts_record_the_runtime_but_share_the_result_hash(dask_client: Client, tmp_path: Path) -> None:
    catalog = _one_clip_per_partition(tmp_path)
    cfg = EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=3.0, runtime="torch")
    embed_catalog(dask_client, catalog, tmp_path / "emb", cfg)
    counts = embed_catalog(dask_client, catalog, tmp_path / "emb", cfg.model_copy(update={"runtime": "openvino"}))
    assert counts["skipped"] == 6
    assert read_embedding_meta(part_path(tmp_path / "emb", 0))["runtime"] == "torch"


def test_cpu_defaults_follow_the_runtime_speed() -> None:
    """OpenVINO: 4 frames a thread per batch and a decoder process per 2 threads (torch: 4 and 4)."""
    settings = embed_settings(EmbedConfig(backbone="tiny_cnn"))
    threads = torch.get_num_threads()
    assert embed_udf.batch_size_for(settings, "cpu", "openvino") == 4 * threads
    assert embed_udf.batch_size_for(settings, "cpu", "torch") == 4 * threads
    assert embed_udf.batch_size_for(settings, "cuda", "torch") == 64
    assert embed_udf.THREADS_PER_DECODER == {"torch": 4, "openvino": 2}


def test_runtime_is_in_no_stage_hash_but_weights_are() -> None:
    from jungletrap.pipeline import stage_hashes

    base = load_config(overrides=["embed.runtime=torch"])
    assert stage_hashes(base) == stage_hashes(load_config(overrides=["embed.runtime=openvino"]))
    assert stage_hashes(base)["embed"] != stage_hashes(load_config(overrides=["embed.weights=random"]))["embed"]
