"""report.html from a small run directory built of real artifacts: real clips, an embedding part with error rows,
OOF/test predictions, then the real ensemble stage (``run_ensemble``: nested ``oof/blend.parquet``, metrics.json
with its ``ensemble`` section, the submission), a manifest and a saved config: the path every real run takes.

No Dask cluster: the report reads artifacts only. The page is parsed with the stdlib HTML parser, so the checks are
about structure (sections, headings, embedded images, table rows), not string fragments.
"""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jungletrap.udfs.embed import EMBED_SCHEMA, embed_partition

from jungletrap.catalog import CATALOG_NAME, catalog_from_paths, write_catalog
from jungletrap.config import DataConfig, EmbedConfig, EnsembleConfig, JobConfig, RunConfig, TrainConfig, save_config
from jungletrap.embed import embed_settings
from jungletrap.ensemble import blend, run_ensemble
from jungletrap.manifest import Manifest
from jungletrap.metrics import mean_log_loss
from jungletrap.report import BLEND, main_classes, oof_predictions, write_report
from jungletrap.schema import CLASS_NAMES, ERROR, FILENAME, FOLD, SPLIT, SPLIT_TRAIN, STATUS, STATUS_ERROR, VIDEO_ID
from jungletrap.synthetic import write_clip

SECTIONS = {
    "summary": "Summary",
    "scores": "Scores",
    "per-class": "Per-class log loss and AUC",
    "calibration": "Calibration (out of fold)",
    "prevalence": "Class prevalence",
    "contact-sheet": "Contact sheet",
    "timings": "Stages",
    "failures": "Failed videos",
    "config": "Configuration",
}
MIN_IMAGES = {"per-class": 2, "calibration": 1, "prevalence": 1, "contact-sheet": 1}
USED = ("blank", "chimpanzee", "elephant", "duiker", "human", "bird", "leopard")
N_TRAIN, N_FOLDS, MODELS = 14, 3, ("xgb", "head")
BROKEN = "broken.mp4"  # a zero-byte training clip: an error row, and the blend's most confident wrong clip
EVIL_REASON = "<script>alert('x')</script> & more"  # must come out escaped


class _Page(HTMLParser):
    """Per section: heading, text, embedded PNG payloads, table rows; plus every src/href of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list[Any]]] = {}
        self.links: list[str] = []
        self.tags: list[str] = []
        self._sid: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "section":
            self._sid = a["id"]
            self.sections[self._sid] = {"h2": [], "text": [], "png": [], "rows": [], "spans": []}
        elif self._sid is None:
            return
        sec = self.sections[self._sid]
        if tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            sec["png"].append(base64.b64decode(a["src"].split(",", 1)[1]))
        elif tag == "span":
            sec["spans"].append(a.get("class", ""))
        elif tag == "tr":
            sec["rows"].append([])
        elif tag in ("h2", "td"):
            self._in = tag
            if tag == "td":
                sec["rows"][-1].append("")  # an empty cell is a cell too

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._sid = None
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._sid is None:
            return
        sec = self.sections[self._sid]
        sec["text"].append(data)
        if self._in == "h2":
            sec["h2"].append(data)
        elif self._in == "td":
            sec["rows"][-1][-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _text(page: _Page, sid: str) -> str:
    return "".join(page.sections[sid]["text"])


def _labels(i: int) -> list[str]:
    first = USED[i % len(USED)]
    return [first] if first == "blank" or i % 4 else [first, USED[(i + 2) % len(USED)]]


def _predictions(ids: list[str], truth: np.ndarray, seed: int, signal: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    proba = np.clip(signal * truth + rng.uniform(0, 1 - signal, truth.shape), 0.01, 0.98)
    return pd.DataFrame(proba, index=pd.Index(ids, name=VIDEO_ID), columns=list(CLASS_NAMES))


def _write_predictions(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.reset_index().to_parquet(path, index=False)


def _catalog(videos: Path) -> pd.DataFrame:
    paths = []
    for i in range(N_TRAIN + 2):  # the last two are test clips
        path = videos / f"clip{i:02d}.mp4"
        write_clip(path, classes=[c for c in _labels(i) if c != "blank"], seed=i, width=160, height=90, fps=4,
                   seconds=3)
        paths.append(path)
    (videos / BROKEN).write_bytes(b"")
    catalog = catalog_from_paths([*paths[:N_TRAIN], videos / BROKEN, *paths[N_TRAIN:]], videos,
                                 videos_per_partition=32)
    train = np.arange(len(catalog)) <= N_TRAIN
    catalog.loc[train, SPLIT] = SPLIT_TRAIN
    catalog.loc[train, FOLD] = (np.arange(train.sum()) % N_FOLDS).astype(np.int32)
    for i in range(len(catalog)):
        labels = _labels(i) if i != N_TRAIN else ["duiker"]
        catalog.loc[i, list(CLASS_NAMES)] = [float(c in labels) for c in CLASS_NAMES]
    return catalog


def _embeddings(catalog: pd.DataFrame, out_dir: Path) -> None:
    settings = embed_settings(EmbedConfig(backbone="tiny_cnn", device="cpu", sample_fps=1, max_seconds=3))
    rows = embed_partition(catalog, settings=settings)
    evil = rows.iloc[[0]].assign(**{VIDEO_ID: "evil<id>.mp4", STATUS: STATUS_ERROR, ERROR: EVIL_REASON})
    table = pa.Table.from_pandas(pd.concat([rows, evil], ignore_index=True), schema=EMBED_SCHEMA,
                                 preserve_index=False)
    out_dir.mkdir(parents=True)
    pq.write_table(table, out_dir / "part-00000.parquet")


def _model_predictions(catalog: pd.DataFrame, run_dir: Path) -> None:
    """``oof/<model>.parquet`` and ``test/<model>.parquet`` as the train stage writes them."""
    train = catalog[catalog[SPLIT] == SPLIT_TRAIN]
    test = catalog[catalog[SPLIT] != SPLIT_TRAIN]
    truth, test_truth = (f[list(CLASS_NAMES)].to_numpy(np.float64) for f in (train, test))
    # equally good models, so the fitted weights depend on the rows they are fitted on (nested != refitted)
    oof = {m: _predictions(list(train[VIDEO_ID]), truth, seed=k, signal=0.5) for k, m in enumerate(MODELS)}
    for frame in oof.values():  # the broken clip: confidently "chimpanzee", truly "duiker"; two more wrong clips
        frame.loc[BROKEN] = 0.01
        frame.loc[BROKEN, "chimpanzee"] = 0.99
        frame.loc[["clip02.mp4", "clip05.mp4"], "hog"] = 0.9
    tests = {m: _predictions(list(test[VIDEO_ID]), test_truth, seed=10 + k, signal=0.5) for k, m in enumerate(MODELS)}
    for m in MODELS:
        _write_predictions(oof[m], run_dir / "oof" / f"{m}.parquet")
        _write_predictions(tests[m], run_dir / "test" / f"{m}.parquet")


def _competition_csvs(catalog: pd.DataFrame, root: Path) -> DataConfig:
    """The submission format and the held-out test labels of the catalog's test clips."""
    test = catalog[catalog[SPLIT] != SPLIT_TRAIN]
    test[[FILENAME, *CLASS_NAMES]].assign(**dict.fromkeys(CLASS_NAMES, 0.5)).to_csv(root / "format.csv", index=False)
    test[[FILENAME, *CLASS_NAMES]].astype(dict.fromkeys(CLASS_NAMES, int)).to_csv(root / "test.csv", index=False)
    return DataConfig(submission_format=str(root / "format.csv"), test_labels=str(root / "test.csv"))


def _config(data: DataConfig, method: str) -> JobConfig:
    return JobConfig(run=RunConfig(name="fake"), data=data, train=TrainConfig(models=list(MODELS)),
                     ensemble=EnsembleConfig(method=method),
                     embed=EmbedConfig(backbone="tiny_cnn", device="cpu", sample_fps=1, max_seconds=3))


def _ensemble_run(run_dir: Path, method: str) -> None:
    """The ensemble stage as a real run does it, then the config it saves (read back by the report)."""
    cfg = _config(DataConfig.model_validate_json((run_dir / "data.json").read_text()), method)
    run_ensemble(cfg, run_dir)
    save_config(cfg, run_dir / "config.yaml")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding every artifact the report reads, made by the real writers and ensemble stage."""
    root = tmp_path_factory.mktemp("report")
    videos, run_dir = root / "videos", root / "fake"
    videos.mkdir()
    catalog = _catalog(videos)
    write_catalog(catalog, run_dir / CATALOG_NAME)
    _embeddings(catalog, run_dir / "embeddings" / "tiny_cnn")
    _model_predictions(catalog, run_dir)
    (run_dir / "data.json").write_text(_competition_csvs(catalog, root).model_dump_json())
    _ensemble_run(run_dir, "weights")
    manifest = Manifest(run_dir)
    for stage, status in (("catalog", "done"), ("embed", "done"), ("train", "failed")):
        manifest.start(stage, "0123456789abcdef")
        manifest.finish(stage, status=status, counts={"rows": len(catalog)},
                        error="RuntimeError: boom" if status == "failed" else None)
    return run_dir


@pytest.fixture(scope="module")
def page(fake_run: Path) -> _Page:
    out = write_report(fake_run, fake_run / "embeddings" / "tiny_cnn")
    assert out == fake_run / "report.html"
    return _parse(out)


def test_every_section_with_heading_and_charts(page: _Page) -> None:
    assert list(page.sections) == list(SECTIONS)
    for sid, title in SECTIONS.items():
        assert "".join(page.sections[sid]["h2"]) == title
    for sid, n in MIN_IMAGES.items():
        pngs = page.sections[sid]["png"]
        assert len(pngs) >= n, sid
        assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 1000 for p in pngs), sid


def test_self_contained_and_escaped(page: _Page, fake_run: Path) -> None:
    raw = (fake_run / "report.html").read_text(encoding="utf-8")
    assert "http://" not in raw and "https://" not in raw
    assert page.links and all(link.startswith(("data:", "#")) for link in page.links)
    assert "script" not in page.tags
    assert EVIL_REASON in _text(page, "failures")  # shown as text, not markup


def test_summary_scores_and_failures(page: _Page, fake_run: Path) -> None:
    metrics = json.loads((fake_run / "metrics.json").read_text())
    summary = _text(page, "summary")
    assert f"{metrics['oof'][BLEND]['mean_log_loss']:.5f}" in summary
    assert f"{metrics['prior_baseline_oof']['mean_log_loss']:.5f}" in summary
    weights = metrics["weights"]
    assert metrics["ensemble"]["method"] == "weights" and weights["xgb"] != pytest.approx(0.5)  # fitted weights
    assert "Blend weights: " + ", ".join(f"{m} {w:.3f}" for m, w in weights.items()) in summary
    assert f"Probability clip: {metrics['clip']:g} " in summary and "Failed videos: 2" in summary
    nested = ", ".join(f"{m} {v:.5f}" for m, v in metrics["ensemble"]["nested_oof_log_loss"].items())
    assert f"Blend method: weights (nested out-of-fold log loss: {nested})" in summary
    rows = [row for row in page.sections["scores"]["rows"] if row]
    assert [row[0] for row in rows] == [*MODELS, BLEND, "class prior", *MODELS, BLEND]  # OOF table, then test
    for row, name in zip(rows, [*MODELS, BLEND, "class prior"], strict=False):  # each row shows its own scores
        scores = metrics["prior_baseline_oof"] if name == "class prior" else metrics["oof"][name]
        assert row[1:3] == [f"{weights[name]:.3f}" if name in weights else "", f"{scores['mean_log_loss']:.5f}"]
    for row, name in zip(rows[4:], [*MODELS, BLEND], strict=True):
        assert row[2] == f"{metrics['test'][name]['mean_log_loss']:.5f}"
    failures = {row[0]: row[1] for row in page.sections["failures"]["rows"] if row}
    assert set(failures) == {BROKEN, "evil<id>.mp4"}
    assert BROKEN in failures[BROKEN]
    assert "RuntimeError: boom" in _text(page, "timings")


def test_contact_sheet_shows_right_wrong_and_undecodable(page: _Page) -> None:
    text = _text(page, "contact-sheet")
    kinds = page.sections["contact-sheet"]["spans"]
    assert kinds[:4] == ["right"] * 4 and kinds[4:] == ["wrong"] * (len(kinds) - 4) and len(kinds) >= 7
    assert BROKEN in text and "frames unavailable: VideoDecodeError" in text and "empty file" in text
    assert f"{BROKEN} wrongtrue: duikertop-3: chimpanzee 0.990" in text  # the most confident wrong comes first
    assert len(page.sections["contact-sheet"]["png"]) == len(kinds) - 1  # every clip but the broken one


def test_oof_predictions_are_the_nested_blend_the_ensemble_stage_saved(fake_run: Path) -> None:
    metrics = json.loads((fake_run / "metrics.json").read_text())
    preds = oof_predictions(fake_run, metrics)
    assert set(preds) == {*MODELS, BLEND}
    catalog = pd.read_parquet(fake_run / CATALOG_NAME).set_index(VIDEO_ID)
    truth = catalog.loc[preds[BLEND].index, list(CLASS_NAMES)]
    assert mean_log_loss(truth.to_numpy(), preds[BLEND].to_numpy()) == pytest.approx(
        metrics["oof"][BLEND]["mean_log_loss"], rel=1e-12)
    # the blender refitted on every OOF row (what the report would rebuild) scores another, optimistic number
    refitted = blend([preds[m] for m in MODELS], np.array([metrics["weights"][m] for m in MODELS]))
    clip = metrics["clip"]
    assert mean_log_loss(truth.to_numpy(), refitted.clip(clip, 1 - clip).to_numpy()) != pytest.approx(
        metrics["oof"][BLEND]["mean_log_loss"], rel=1e-6)
    counts = truth.sum()
    usable = [c for c in CLASS_NAMES if 0 < counts[c] < len(truth)]
    assert main_classes(truth) == sorted(usable, key=lambda c: (-counts[c], CLASS_NAMES.index(c)))[:6]


def test_older_run_without_weights_test_or_embeddings(fake_run: Path, tmp_path: Path) -> None:
    """Runs made before weights or the blend were recorded still render; equal weights are assumed."""
    run_dir = tmp_path / "old"
    shutil.copytree(fake_run, run_dir, ignore=shutil.ignore_patterns("embeddings", "report.html", "blend.parquet"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["weights"], metrics["test"], metrics["ensemble"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    page = _parse(write_report(run_dir, run_dir / "embeddings" / "tiny_cnn"))
    assert list(page.sections) == list(SECTIONS)
    assert "equal" in _text(page, "summary") and "Failed videos: 0" in _text(page, "summary")
    assert "Held-out" not in _text(page, "scores")
    assert _text(page, "failures").endswith("None.")


def test_stacker_blend_shows_no_weights(fake_run: Path, tmp_path: Path) -> None:
    """A stacker has no per-model weight: the scores table must not show equal weights it never used."""
    run_dir = tmp_path / "stacker"
    shutil.copytree(fake_run, run_dir, ignore=shutil.ignore_patterns("report.html"))
    _ensemble_run(run_dir, "stacker")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ensemble"]["method"] == "stacker" and "weights" not in metrics
    page = _parse(write_report(run_dir, run_dir / "embeddings" / "tiny_cnn"))
    assert "per-class logistic regression" in _text(page, "summary")
    rows = [row for row in page.sections["scores"]["rows"] if row]
    assert [row[1] for row in rows[:2]] == ["", ""], rows[:2]


def test_shared_stacker_blend_shows_its_coefficients_and_auto_its_fold_methods(fake_run: Path,
                                                                               tmp_path: Path) -> None:
    """The shared stacker has one coefficient per model (shown, no weights); ``auto`` names each fold's method."""
    run_dir = tmp_path / "shared"
    shutil.copytree(fake_run, run_dir, ignore=shutil.ignore_patterns("report.html"))
    _ensemble_run(run_dir, "shared_stacker")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "weights" not in metrics and set(metrics["logit_coef"]) == set(metrics["models"])
    summary = _text(_parse(write_report(run_dir, run_dir / "embeddings" / "tiny_cnn")), "summary")
    assert "one logistic regression on the models' logits for every class" in summary
    assert all(f"{m} {c:.3f}" in summary for m, c in metrics["logit_coef"].items())
    _ensemble_run(run_dir, "auto")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    folds = metrics["ensemble"]["fold_methods"]
    summary = _text(_parse(write_report(run_dir, run_dir / "embeddings" / "tiny_cnn")), "summary")
    assert all(f"fold {k} {m}" in summary for k, m in folds.items()), summary
