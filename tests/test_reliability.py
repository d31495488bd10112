"""Reliability: bad inputs, a worker killed mid-stage, Ctrl-C/SIGTERM and resume, bad config, security defaults.

Everything is real: generated clips and broken files on disk, the CLI in a subprocess with its own LocalCluster of
worker processes, a test-owned 2-process LocalCluster whose worker is SIGKILLed, signals sent to the CLI process.

The bad-input runs use two worker processes (a fold of a dataset this small sits in one chunk: its training and
validation rows can land on different workers, which once broke multi-target ``xgboost.dask``); the interruption
runs use one (CI has 2 cores, and their timing must leave partitions to interrupt).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import av
import cv2
import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from distributed import Client, LocalCluster
from jungletrap.udfs.embed import EMBED_SCHEMA

from jungletrap.catalog import catalog_from_paths, write_catalog
from jungletrap.cluster import open_client
from jungletrap.config import ClusterConfig, EmbedConfig
from jungletrap.embed import embed_catalog, read_embedding_meta
from jungletrap.schema import CLASS_NAMES, FILENAME, PARTITION, VIDEO_ID
from jungletrap.storage import TMP_MARK
from jungletrap.synthetic import write_clip

from .conftest import REPO

CLI = str(Path(sys.executable).parent / "jungletrap")
WEIRD = "Taï \"quoted\" 'clip' ü.mp4"
#: Small, fast settings for every CLI run here (tiny backbone, few frames, few trees and epochs).
SMALL = [
    "embed.backbone=tiny_cnn",
    "embed.sample_fps=1",
    "embed.max_seconds=4",
    "catalog.n_folds=2",
    "train.xgb.n_estimators=20",
    "train.head.epochs=3",
    "train.head.max_frames=4",
    "cluster.kind=cpu",
]
#: The bad-input runs: a third of their clips are broken on purpose, above the default max_failed_fraction.
LENIENT = [*SMALL, "cluster.n_workers=2", "run.max_failed_fraction=0.5"]
#: Broken inputs and the reason their error row must give.
BROKEN = {
    "zero.mp4": "empty file",
    "header_only.mp4": "not a readable video container",
    "half.mp4": "not a readable video container",  # an MP4 keeps its index (moov) at the end: cut, it is lost
    "text.avi": "not a readable video container",
    "image.avi": "still image",
    "audio_only.mp4": "no video stream",
    "adir.mp4": "is a directory",
    "dangling.mp4": "broken symlink",
    "missing.mp4": "file not found",
}
#: Odd but readable inputs: they must come out ``ok``.
ODD_OK = ["half.mkv", "one_frame.mp4", "huge.mp4", WEIRD]


# ---------------------------------------------------------------- helpers


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """A child started from a shell's background job inherits SIGINT ignored; Ctrl-C must reach the CLI."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a handled signal is reset to default on exec
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_labels(path: Path, classes: dict[str, list[str]]) -> None:
    frame = pd.DataFrame(0.0, index=range(len(classes)), columns=list(CLASS_NAMES))
    for i, names in enumerate(classes.values()):
        frame.loc[i, names] = 1.0
    frame.insert(0, FILENAME, list(classes))
    frame.to_csv(path, index=False)


def _write_config(root: Path, train: dict[str, list[str]], test: list[str]) -> Path:
    """The competition layout under ``root`` (videos/ + two CSVs) and a config pointing at it."""
    _write_labels(root / "train_labels.csv", train)
    _write_labels(root / "submission_format.csv", {name: [] for name in test})
    cfg = {"run": {"name": "reliability", "root": str(root / "runs")},
           "data": {"videos": str(root / "videos"), "labels": str(root / "train_labels.csv"),
                    "submission_format": str(root / "submission_format.csv")}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _write_audio_only(path: Path) -> None:
    """An MP4 holding one AAC stream and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(16):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _clip(path: Path, seed: int, classes: list[str] | None = None, **size: float) -> None:
    opts = {"width": 160, "height": 90, "fps": 4, "seconds": 3, **size}
    write_clip(path, classes=classes if classes is not None else [CLASS_NAMES[seed % 3]], seed=seed, **opts)


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def _embeddings(directory: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in _parts(directory)], ignore_index=True)


def _no_traceback(*streams: str) -> None:
    for text in streams:
        assert "Traceback" not in text, text[-3000:]


# ---------------------------------------------------------------- 1. bad inputs through run and predict


def _write_bad_files(videos: Path, good: Path) -> None:
    """Every broken or odd input next to the good clips (``good`` is a readable clip to cut up)."""
    data = good.read_bytes()
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "header_only.mp4").write_bytes(data[:1024])
    (videos / "half.mp4").write_bytes(data[: len(data) // 2])
    _clip(videos / "full.mkv", seed=50)
    mkv = (videos / "full.mkv").read_bytes()
    (videos / "full.mkv").unlink()
    (videos / "half.mkv").write_bytes(mkv[: len(mkv) // 2])  # Matroska: header first, the cut tail is lost
    (videos / "text.avi").write_text("this is not a video\n" * 20, encoding="utf-8")
    jpeg = videos / "image.jpg"
    assert cv2.imwrite(str(jpeg), np.full((90, 160, 3), 128, np.uint8))
    jpeg.rename(videos / "image.avi")
    _write_audio_only(videos / "audio_only.mp4")
    _clip(videos / "one_frame.mp4", seed=51, seconds=0.25)
    _clip(videos / "huge.mp4", seed=52, width=3840, height=2160, seconds=0.5)  # 4K, 2 frames
    (videos / "adir.mp4").mkdir()
    (videos / "dangling.mp4").symlink_to(videos / "nowhere.mp4")


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 good training clips (+ the odd name, + one listed but absent) and a test split full of bad files."""
    root = tmp_path_factory.mktemp("bad inputs")
    videos = root / "videos"
    videos.mkdir()
    train: dict[str, list[str]] = {}
    for i in range(12):
        _clip(videos / f"train_{i:02d}.mp4", seed=i)
        train[f"train_{i:02d}.mp4"] = [CLASS_NAMES[i % 3]]
    _clip(videos / WEIRD, seed=20)
    train[WEIRD] = [CLASS_NAMES[1]]
    train["missing.mp4"] = [CLASS_NAMES[0]]  # listed in the labels, never written
    for i in range(2):
        _clip(videos / f"test_{i}.mp4", seed=30 + i)
    _write_bad_files(videos, good=videos / "test_0.mp4")
    test = ["test_0.mp4", "test_1.mp4", *[n for n in [*BROKEN, *ODD_OK] if n not in train]]
    return root, _write_config(root, train, test)


@pytest.fixture(scope="module")
def bad_run(bad_dataset: tuple[Path, Path]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root, config = bad_dataset
    run_dir = root / "runs" / "lenient"
    proc = _cli("run", "--config", str(config), *_sets(LENIENT), "--run-dir", str(run_dir), cwd=root)
    return run_dir, proc


@pytest.mark.slow
def test_run_with_bad_inputs_finishes_and_reports_the_failures(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, proc = bad_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(BROKEN)} failed" in proc.stdout, proc.stdout
    _no_traceback(proc.stderr, proc.stdout)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert {s: r["status"] for s, r in manifest["stages"].items()} == dict.fromkeys(
        ("catalog", "embed", "features", "train", "ensemble"), "done")
    assert manifest["stages"]["embed"]["counts"]["failed"] == len(BROKEN)
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert all(name in html for name in ("zero.mp4", "audio_only.mp4", "dangling.mp4"))


@pytest.mark.slow
def test_every_input_has_one_embedding_row_naming_the_file(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path],
) -> None:
    run_dir, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, _ = bad_dataset
    listed = [*pd.read_csv(root / "train_labels.csv")[FILENAME], *pd.read_csv(root / "submission_format.csv")[FILENAME]]
    emb = _embeddings(run_dir / "embeddings" / "tiny_cnn")
    assert sorted(emb[VIDEO_ID]) == sorted(listed) and emb[VIDEO_ID].is_unique
    rows = emb.set_index(VIDEO_ID)
    for name, reason in BROKEN.items():
        row = rows.loc[name]
        assert row["status"] == "error" and row["n_frames"] == 0 and len(row["embedding"]) == 0, name
        assert name in row["error"] and reason in row["error"], (name, row["error"])
    good = rows.drop(index=list(BROKEN))
    assert (good["status"] == "ok").all() and good["error"].isna().all()
    assert rows.loc["half.mkv", "warning"].startswith("truncated: the video stream ends at 1.50 s of 3.00 s declared")
    assert good.drop(index="half.mkv")["warning"].isna().all()
    assert (good["n_frames"] >= 1).all()
    assert rows.loc["one_frame.mp4", "n_frames"] == 1
    assert 1 <= rows.loc["half.mkv", "n_frames"] < rows.loc["test_0.mp4", "n_frames"]  # what decoded before the cut
    assert (rows.loc["huge.mp4", "width"], rows.loc["huge.mp4", "height"]) == (3840, 2160)
    assert rows.loc[WEIRD, "n_frames"] == 3


@pytest.mark.slow
def test_submission_keeps_every_row_despite_bad_inputs(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path],
) -> None:
    run_dir, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, _ = bad_dataset
    fmt = pd.read_csv(root / "submission_format.csv")
    sub = pd.read_csv(run_dir / "submission.csv")
    assert list(sub.columns) == list(fmt.columns)
    assert sub[FILENAME].tolist() == fmt[FILENAME].tolist()
    values = sub[list(CLASS_NAMES)].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all() and (values < 1).all()


@pytest.mark.slow
def test_strict_run_with_bad_inputs_exits_1(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path],
) -> None:
    """The same run with ``--strict`` (a copy of the finished run, so every stage is skipped) exits 1."""
    lenient, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, config = bad_dataset
    run_dir = root / "runs" / "strict"
    shutil.copytree(lenient, run_dir)
    proc = _cli("run", "--config", str(config), *_sets(LENIENT), "--run-dir", str(run_dir), "--strict", cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("already done for this config, skipped") == 5
    assert f"{len(BROKEN)} failed" in proc.stdout
    assert f"error: {len(BROKEN)} video(s) failed" in proc.stderr
    _no_traceback(proc.stderr, proc.stdout)


def _embed_status_line(run_dir: Path, cwd: Path) -> list[str]:
    proc = _cli("status", "--run-dir", str(run_dir), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return next(line for line in proc.stdout.splitlines() if line.startswith("embed ")).split()


@pytest.mark.slow
def test_failures_are_counted_from_every_part_after_force(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path],
) -> None:
    """``--force`` re-runs embed, which finds every part whole: the failures are still all counted, the same
    number in the summary, the exit code, the manifest, ``status`` and the report."""
    lenient, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, config = bad_dataset
    run_dir = root / "runs" / "forced"
    shutil.copytree(lenient, run_dir)
    proc = _cli("embed", "--config", str(config), *_sets(LENIENT), "--run-dir", str(run_dir), "--force",
                "--strict", cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"videos: 0 embedded, 27 skipped, {len(BROKEN)} failed, 1 truncated" in proc.stdout
    assert f"error: {len(BROKEN)} video(s) failed" in proc.stderr
    _no_traceback(proc.stderr, proc.stdout)
    embed = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["stages"]["embed"]
    assert embed["status"] == "done" and embed["counts"]["failed"] == len(BROKEN)
    assert _embed_status_line(run_dir, root)[1:4:2] == ["done", str(len(BROKEN))]
    assert f"Failed videos: {len(BROKEN)}" in (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_too_many_failed_clips_stop_the_embed_stage_with_exit_1(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path],
) -> None:
    """With the default run.max_failed_fraction (5 %) a third of the clips failing stops the run, naming the
    count and the commonest reason, and the manifest and ``status`` say so."""
    lenient, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, config = bad_dataset
    run_dir = root / "runs" / "too many"
    shutil.copytree(lenient, run_dir)
    proc = _cli("run", "--config", str(config), *_sets([*SMALL, "cluster.n_workers=2"]), "--run-dir", str(run_dir),
                "--force", cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (f"error: embed: {len(BROKEN)} of 27 videos failed (33.3%, more than run.max_failed_fraction=0.05); "
            "commonest reasons: not a readable video container (Invalid data found when processing input) (3); "
            ) in proc.stderr
    _no_traceback(proc.stderr, proc.stdout)
    stages = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["stages"]
    assert stages["embed"]["status"] == "failed" and stages["embed"]["counts"]["failed"] == len(BROKEN)
    assert "TooManyFailures" in stages["embed"]["error"] and stages["features"]["status"] == "done"  # not re-run
    assert _embed_status_line(run_dir, root)[1:4:2] == ["failed", str(len(BROKEN))]


@pytest.mark.slow
def test_predict_gives_one_row_per_file_with_reasons(
    bad_run: tuple[Path, subprocess.CompletedProcess[str]], bad_dataset: tuple[Path, Path], tmp_path: Path,
) -> None:
    run_dir, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    root, _ = bad_dataset
    clips = tmp_path / "new clips"
    clips.mkdir()
    names = ["test_0.mp4", *[n for n in [*BROKEN, *ODD_OK] if n != "missing.mp4"]]
    for name in names:
        src = root / "videos" / name
        if src.is_symlink():
            (clips / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            (clips / name).mkdir()
        else:
            shutil.copy2(src, clips / name)
    out = tmp_path / "predictions.csv"
    proc = _cli("predict", "--run-dir", str(run_dir), "--videos", str(clips), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"({len(names)} videos, {len(BROKEN) - 1} failed)" in proc.stdout
    _no_traceback(proc.stderr, proc.stdout)
    pred = pd.read_csv(out).set_index(FILENAME)
    assert sorted(pred.index) == sorted(names)
    for name, reason in BROKEN.items():
        if name == "missing.mp4":
            continue
        row = pred.loc[name]
        assert row["status"] == "error" and name in row["error"] and reason in row["error"], (name, row["error"])
        assert row[list(CLASS_NAMES)].isna().all()
    ok = pred.drop(index=[n for n in BROKEN if n in pred.index])
    assert (ok["status"] == "ok").all() and ok[list(CLASS_NAMES)].notna().all(axis=None)


# ---------------------------------------------------------------- 2. worker loss


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of every part: a part written again (temp file + rename) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _parts(directory)}


@pytest.mark.slow
def test_worker_killed_mid_embed_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-stage costs only its partitions in flight: no part finished before the kill is
    embedded again (the client released their futures, the tasks are idempotent), and the output equals a
    clean run's."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(12):  # 128 frames each, all sampled: a partition of 2 takes about a second on one core
        _clip(clips / f"clip_{i:02d}.mp4", seed=i, width=320, height=180, fps=16, seconds=8)
    catalog = catalog_from_paths(sorted(clips.glob("*.mp4")), clips, videos_per_partition=2)
    write_catalog(catalog, tmp_path / "catalog.parquet")
    n_parts = int(catalog[PARTITION].nunique())
    out = tmp_path / "emb"
    cfg = EmbedConfig(backbone="tiny_cnn", sample_fps=16, max_seconds=8, device="cpu", retries=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        pids: dict[str, int] = client.run(os.getpid)
        killed: tuple[int, list[str]] | None = None
        before_kill: dict[str, tuple[int, int]] = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            job = pool.submit(embed_catalog, client, tmp_path / "catalog.parquet", out, cfg)
            deadline = time.monotonic() + 240
            while not job.done() and time.monotonic() < deadline:
                # Two workers start together: by the second part each has most likely finished one.
                if killed is None and 2 <= len(_parts(out)) < n_parts:
                    busy = {w: keys for w, keys in client.processing().items() if keys and w in pids}
                    held = client.has_what()  # finished results still on each worker (none once released)
                    victim = max(busy or pids, key=lambda w: sum(str(k).startswith("embed-") for k in held.get(w, ())))
                    before_kill = _stamps(out)
                    os.kill(pids[victim], signal.SIGKILL)
                    killed = (pids[victim], [str(k) for k in busy.get(victim, [])])
                time.sleep(0.02)
            counts = job.result(timeout=max(1.0, deadline - time.monotonic()))
        assert killed is not None, "embed finished before a worker could be killed mid-way: make it slower"
        assert any(k.startswith("embed-") for k in killed[1]), f"the killed worker was not embedding: {killed}"
        client.wait_for_workers(2, timeout=60)
        assert killed[0] not in set(client.run(os.getpid).values())  # the nanny started a fresh process
        after = _stamps(out)
        rewritten = [name for name, stamp in before_kill.items() if after.get(name) != stamp]
        assert rewritten == [], f"parts finished before the kill were embedded again: {rewritten}"
        clean = tmp_path / "clean"
        embed_catalog(client, tmp_path / "catalog.parquet", clean, cfg)
    assert counts == {"partitions": n_parts, "videos": 12, "embedded": 12, "skipped": 0, "failed": 0,
                      "warnings": 0}
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]
    parts = _parts(out)
    assert len(parts) == n_parts
    seen: list[str] = []
    result_hashes = set()
    for path in parts:
        table = pq.read_table(path)
        meta = read_embedding_meta(path)
        ids = table.column(VIDEO_ID).to_pylist()
        partition = int(path.stem.split("-")[1])
        assert ids == catalog.loc[catalog[PARTITION] == partition, VIDEO_ID].tolist()
        assert table.schema.remove_metadata().equals(EMBED_SCHEMA.remove_metadata())
        assert meta["n_rows"] == table.num_rows and meta["backbone"] == "tiny_cnn" and meta["feature_dim"] == 64
        assert table.column("status").to_pylist() == ["ok"] * table.num_rows
        assert table.equals(pq.read_table(clean / path.name)), f"{path.name} differs from a clean run's"
        assert meta == read_embedding_meta(clean / path.name)
        result_hashes.add(meta["result_hash"])
        seen += ids
    assert sorted(seen) == sorted(catalog[VIDEO_ID]) and len(seen) == len(set(seen))
    assert len(result_hashes) == 1


# ---------------------------------------------------------------- 3. interruption and resume


def _run_until_parts_then_signal(args: list[str], cwd: Path, parts_dir: Path, *, at_least: int, total: int,
                                 sig: signal.Signals) -> tuple[int, str, int]:
    """Start the CLI, send ``sig`` once ``at_least`` parts exist; return (exit code, stderr, parts at signal)."""
    err_path = cwd / f"stderr-{sig.name}.txt"
    with open(err_path, "w", encoding="utf-8") as err, _sigint_not_ignored():
        proc = subprocess.Popen([CLI, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
    try:
        deadline = time.monotonic() + 240
        while len(_parts(parts_dir)) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        at_signal = len(_parts(parts_dir))
        assert proc.poll() is None, f"the run ended before {sig.name}: {err_path.read_text(encoding='utf-8')}"
        assert at_signal < total, f"embed finished before {sig.name} could interrupt it: make it slower"
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say where it waits: the CLI prints every thread's stack on SIGUSR1
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            raise AssertionError(f"no exit 120 s after {sig.name}:\n"
                                 f"{err_path.read_text(encoding='utf-8')[-12000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, err_path.read_text(encoding="utf-8"), at_signal


def _mtimes(parts_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in _parts(parts_dir)}


@pytest.mark.slow
def test_interrupt_twice_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    names = [f"clip_{i:02d}.mp4" for i in range(30)]
    for i, name in enumerate(names):  # 64 frames each, all sampled: a partition of 3 takes ~0.5 s on one core
        _clip(tmp_path / "videos" / name, seed=i, width=320, height=180, fps=8, seconds=8)
    train = {n: [CLASS_NAMES[i % 4]] for i, n in enumerate(names[:24])}
    config = _write_config(tmp_path, train, names[24:])
    sets = _sets([*SMALL, "cluster.n_workers=1", "embed.sample_fps=8", "embed.max_seconds=8",
                  "catalog.videos_per_partition=3"])
    total = 10
    run_dir = tmp_path / "runs" / "interrupted"
    parts_dir = run_dir / "embeddings" / "tiny_cnn"
    args = ["run", "--config", str(config), *sets, "--run-dir", str(run_dir)]

    kept: dict[str, int] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, stderr, _ = _run_until_parts_then_signal(args, tmp_path, parts_dir, at_least=max(2, len(kept) + 1),
                                                        total=total, sig=sig)
        assert code == 130, stderr[-3000:]
        assert "interrupted: run the same command again to resume" in stderr
        if "did not close within" in stderr:  # bounded (cluster.stop_timeout_s), yet a clean stop should not need it
            warnings.warn(f"the stop after {sig.name} waited out cluster.stop_timeout_s:\n{stderr[-8000:]}",
                          stacklevel=1)
        _no_traceback(stderr)
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["stages"]["embed"]["status"] == "interrupted"
        assert manifest["stages"]["catalog"]["status"] == "done"
        now = _mtimes(parts_dir)
        assert len(now) < total
        assert {k: now[k] for k in kept} == kept  # parts finished by the earlier run were not rewritten
        kept = now
    events = [e["event"] for e in manifest["events"]]
    assert events.count("embed interrupted") == 2

    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = 3 * len(kept)
    assert f"{skipped} videos already embedded" in proc.stderr
    assert f"videos: {30 - skipped} embedded, {skipped} skipped, 0 failed" in proc.stdout
    final = _mtimes(parts_dir)
    assert len(final) == total and {k: final[k] for k in kept} == kept
    assert not [p for p in parts_dir.iterdir() if TMP_MARK in p.name]
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert all(rec["status"] == "done" for rec in manifest["stages"].values()) and len(manifest["stages"]) == 5
    emb = _embeddings(parts_dir)
    assert sorted(emb[VIDEO_ID]) == sorted(names)

    reference = tmp_path / "runs" / "reference"
    proc = _cli("run", "--config", str(config), *sets, "--run-dir", str(reference), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = pd.read_csv(run_dir / "submission.csv")
    expected = pd.read_csv(reference / "submission.csv")
    assert resumed[FILENAME].tolist() == expected[FILENAME].tolist()
    np.testing.assert_allclose(resumed[list(CLASS_NAMES)].to_numpy(), expected[list(CLASS_NAMES)].to_numpy(),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 4. bad config


BAD_CONFIGS: dict[str, tuple[list[str], list[str]]] = {
    # case: (extra CLI arguments, strings stderr must contain)
    "unknown key": (_sets(["embed.framez=3"]), ["embed.framez", "unknown key"]),
    "wrong type": (_sets(["embed.batch_size=abc"]), ["embed.batch_size", "integer", "'abc'"]),
    "negative frames": (_sets(["embed.n_frames=-2"]), ["embed.n_frames", "greater than or equal to 1"]),
    "unknown backbone": (_sets(["embed.backbone=vgg99"]),
                         ["embed.backbone", "vgg99", "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, "
                                                     "resnet152_skip, tiny_cnn"]),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], int, str]]:
    """Every bad-config invocation, started together (each costs seconds of imports), then collected."""
    procs = {}
    for case in [*BAD_CONFIGS, "run dir is a file", "unknown section in the file"]:
        tmp = tmp_path_factory.mktemp("badcfg")
        args = ["run", *_sets([f"run.root={tmp / 'runs'}", "cluster.kind=cpu"])]
        if case in BAD_CONFIGS:
            args += BAD_CONFIGS[case][0]
        elif case == "run dir is a file":
            (tmp / "taken").write_text("not a directory", encoding="utf-8")
            args += ["--run-dir", str(tmp / "taken")]
        else:
            (tmp / "bad.yaml").write_text("trian:\n  epochs: 3\n", encoding="utf-8")
            args += ["--config", str(tmp / "bad.yaml")]
        before = sorted(p.name for p in tmp.iterdir())
        procs[case] = (tmp, before, subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     text=True, cwd=tmp))
    results = {}
    for case, (tmp, before, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        results[case] = (tmp, before, proc.returncode, stderr)
    return results


@pytest.mark.parametrize("case", [*BAD_CONFIGS, "run dir is a file", "unknown section in the file"])
def test_bad_config_exits_2_naming_the_problem_before_any_work(
    bad_config_runs: dict[str, tuple[Path, list[str], int, str]], case: str,
) -> None:
    tmp, before, code, stderr = bad_config_runs[case]
    assert code == 2, stderr
    expected = BAD_CONFIGS[case][1] if case in BAD_CONFIGS else {
        "run dir is a file": [str(tmp / "taken"), "not a directory"],
        "unknown section in the file": ["trian", "unknown key", str(tmp / "bad.yaml")],
    }[case]
    for text in expected:
        assert text in stderr, (text, stderr)
    _no_traceback(stderr)
    assert sorted(p.name for p in tmp.iterdir()) == before  # no run directory, no manifest, nothing
    if case == "run dir is a file":
        assert (tmp / "taken").read_text(encoding="utf-8") == "not a directory"


# ---------------------------------------------------------------- 5. security defaults


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except OSError:
        return True


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only() -> None:
    with open_client(ClusterConfig(kind="cpu", n_workers=1)) as (client, info):
        scheduler = urlparse(client.scheduler.address)
        dashboard = urlparse(info.dashboard_link or "")
        workers = list(client.scheduler_info()["workers"])
        assert scheduler.scheme == "tcp" and scheduler.hostname == "127.0.0.1"
        assert dashboard.hostname == "127.0.0.1" and dashboard.port
        assert workers and all(urlparse(w).hostname == "127.0.0.1" for w in workers)
        ports = [scheduler.port, dashboard.port, *(urlparse(w).port for w in workers)]
        assert not any(_refused("127.0.0.1", p) for p in ports)
        # Bound to loopback, not to every interface: this machine's other addresses refuse the same ports.
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for host in others:
            assert all(_refused(host, p) for p in ports), host


_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
_PICKLE_LOADERS = {"load", "loads", "Unpickler", "open"}


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def _unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that unpickle: pickle-family loads, torch.load without weights_only=True, pickled numpy/pandas."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names if a.name in _PICKLE_LOADERS]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        if owner in _PICKLE_MODULES and name in _PICKLE_LOADERS:
            found.append(f"{where}: {owner}.{name}")
        elif owner == "torch" and name == "load" and not _is_true(node, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        elif owner in ("np", "numpy") and name == "load" and _is_true(node, "allow_pickle"):
            found.append(f"{where}: numpy.load(allow_pickle=True)")
        elif owner in ("pd", "pandas") and name == "read_pickle":
            found.append(f"{where}: pandas.read_pickle")
    return found


def test_the_unpickling_check_catches_what_it_should() -> None:
    bad = ("import pickle, torch, numpy as np\nfrom pickle import loads\npickle.load(f)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n")
    assert len(_unsafe_loads(bad, "bad.py")) == 5
    assert _unsafe_loads("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n", "ok.py") == []


def test_package_never_unpickles() -> None:
    files = [p for d in ("src", "udfs", "jobs") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for p in files for hit in _unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == []
