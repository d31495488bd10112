"""``report.html``: one self-contained page a person reads instead of scrolling logs.

Sections: summary, scores per model vs the class-prior baseline, per-class log loss and AUC, reliability curves
for the most prevalent classes, class prevalence, a contact sheet of the blend's most confident right and wrong
clips, stage timings, failed videos with reasons, and the resolved config. Charts are matplotlib PNGs (Agg)
embedded as base64, so the file has no external URL and can be mailed or archived on its own.

Reliability curves use scikit-learn's ``calibration_curve`` with quantile bins: most probabilities of a rare
class sit near 0, and uniform bins would leave the upper bins with one or two clips each. The out-of-fold blend
is not an artifact of its own; :func:`oof_predictions` rebuilds it from ``oof/<model>.parquet`` with the weights
and clip recorded in ``metrics.json``, exactly as the ensemble stage made it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
from distributed import Client
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # figures without pyplot: no global backend switch (notebooks keep theirs)
from sklearn.calibration import calibration_curve

from jungletrap.catalog import CATALOG_NAME
from jungletrap.config import ConfigError, EmbedConfig, load_config
from jungletrap.ensemble import blend
from jungletrap.manifest import Manifest
from jungletrap.schema import (
    CLASS_NAMES,
    ERROR,
    PATH,
    SPLIT,
    SPLIT_TRAIN,
    STATUS,
    STATUS_ERROR,
    VIDEO_ID,
)
from jungletrap.storage import RunPath, open_clip, read_parquet, write_text_atomic
from jungletrap.train import prediction_path, read_predictions
from jungletrap.video import read_clip

__all__ = ["write_report", "failed_videos", "oof_predictions", "main_classes", "BLEND"]

BLEND = "blend"
N_MAIN_CLASSES = 6  # classes given reliability curves: the most prevalent in the training labels
CALIBRATION_BINS = 8
CONTACT_PER_KIND = 4  # clips per kind (confidently right, confidently wrong) on the contact sheet
CONTACT_FRAMES = 4
CONTACT_SIZE = 128
_DECODE_TIMEOUT_S = 30.0
#: Failed videos listed in the report: a run of 200k clips may have thousands, and the page must stay small
#: (every failure is in the embedding parts' ``error`` column).
MAX_FAILURES_SHOWN = 200

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1150px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#eee}td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}
nav a{margin-right:1em}.sheet{display:flex;flex-wrap:wrap;gap:1.2em}figure{margin:0;max-width:540px}
figcaption{font-size:90%}.right{color:#176b2c}.wrong{color:#b00020}.err{color:#b00020;font-family:monospace}"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _png(fig: Figure, alt: str = "chart") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return _img(buf.getvalue(), alt)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _models(metrics: dict[str, Any]) -> list[str]:
    return list(metrics.get("models") or [m for m in metrics["oof"] if m != BLEND])


def _weights(metrics: dict[str, Any]) -> dict[str, float]:
    """Recorded blend weights; none for a stacker (it has no weight per model); equal weights for runs made
    before the ensemble stage recorded them."""
    models = _models(metrics)
    if not metrics.get("weights") and metrics.get("ensemble", {}).get("method") in ("stacker", "shared_stacker"):
        return {}
    return {m: float(w) for m, w in (metrics.get("weights") or {m: 1 / len(models) for m in models}).items()}


def oof_predictions(run_dir: RunPath, metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Each model's out-of-fold probabilities (indexed by ``video_id``) plus the clipped blend under ``"blend"``.

    The ensemble stage saves only the blend's scores, so the blend is rebuilt here with
    :func:`jungletrap.ensemble.blend`, the recorded weights and the recorded clip.
    """
    models = _models(metrics)
    preds = {m: read_predictions(prediction_path(run_dir, "oof", m)) for m in models}
    index = preds[models[0]].index
    preds = {m: p.loc[index, list(CLASS_NAMES)] for m, p in preds.items()}
    saved = prediction_path(run_dir, "oof", BLEND)
    if saved.exists():  # written by the ensemble stage whatever its method
        preds[BLEND] = read_predictions(saved).loc[index, list(CLASS_NAMES)]
        return preds
    weights = _weights(metrics)
    clip = float(metrics.get("clip", 0.0))
    preds[BLEND] = blend(list(preds.values()), np.array([weights[m] for m in models])).clip(clip, 1 - clip)
    return preds


def main_classes(truth: pd.DataFrame, n: int = N_MAIN_CLASSES) -> list[str]:
    """The ``n`` most prevalent classes that have both positive and negative clips (ties: competition order)."""
    counts = truth[list(CLASS_NAMES)].sum()
    usable = counts[(counts > 0) & (counts < len(truth))]
    return usable.sort_values(ascending=False, kind="stable").index[:n].tolist()


def failed_videos(embed_dir: RunPath) -> pd.DataFrame:
    """Every video whose decode failed, with the reason, from the embedding parts."""
    parts = sorted(embed_dir.glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=[VIDEO_ID, ERROR])
    frame = pd.concat([read_parquet(p, columns=[VIDEO_ID, STATUS, ERROR]) for p in parts], ignore_index=True)
    return frame.loc[frame[STATUS] == STATUS_ERROR, [VIDEO_ID, ERROR]].reset_index(drop=True)


# ---------------------------------------------------------------- sections


def _only(model: str, models: list[str]) -> str:
    """The settings that train ``model`` alone: a head per backbone is ``head`` plus a choice of backbone."""
    if model.startswith("head_"):
        return f"train.models=[head] with embed.backbones=[{model.removeprefix('head_')}]"
    several = model == "head" and any(m.startswith("head_") for m in models)
    return f"train.models=[{model}]" + (" with the main backbone alone in embed.backbones" if several else "")


def _summary(metrics: dict[str, Any], n_failed: int, n_train: int) -> str:
    blend_ll, prior = metrics["oof"][BLEND]["mean_log_loss"], metrics["prior_baseline_oof"]["mean_log_loss"]
    gain = f" ({1 - blend_ll / prior:.1%} lower)" if prior > 0 else ""
    ensemble = metrics.get("ensemble", {})
    method = ensemble.get("method", "weights" if metrics.get("weights") else "mean")
    if metrics.get("weights"):
        weights = ", ".join(f"{m} {w:.3f}" for m, w in _weights(metrics).items())
    elif method == "stacker":
        weights = "per-class logistic regression on the models' logits (models/ensemble.json)"
    elif method == "shared_stacker":
        coef = ", ".join(f"{m} {c:.3f}" for m, c in metrics.get("logit_coef", {}).items())
        weights = f"one logistic regression on the models' logits for every class (coefficients: {coef})"
    else:
        weights = "equal (plain mean; this run did not record weights)"
    nested = ", ".join(f"{m} {v:.5f}" for m, v in ensemble.get("nested_oof_log_loss", {}).items())
    items = [f"Blend method: {method}" + (f" (nested out-of-fold log loss: {nested})" if nested else ""),
             *(["The blend's out-of-fold score blends each fold with the method that won on the other folds alone: "
                + ", ".join(f"fold {k} {m}" for k, m in ensemble["fold_methods"].items())]
               if ensemble.get("fold_methods") else []),
             f"Probability clip: {metrics.get('clip', 0.0):g} (chosen on out-of-fold predictions)",
             f"Blend weights: {weights}", f"Failed videos: {n_failed}"]
    singles = {m: v["mean_log_loss"] for m, v in metrics["oof"].items() if m != BLEND}
    best = min(singles, key=lambda m: singles[m]) if singles else None
    if best is not None and blend_ll > singles[best]:
        items.append(f"Note: the blend's nested out-of-fold loss {blend_ll:.5f} is above the best single model's "
                     f"({best}, {singles[best]:.5f}): its blender is fitted without the fold it predicts, which "
                     "costs more than the models disagree on this data; prefer " + _only(best, list(singles)) + ".")
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return (f"<p>Blend out-of-fold mean log loss <b>{blend_ll:.5f}</b> versus <b>{prior:.5f}</b> for the "
            f"class-prior baseline{html.escape(gain)}, over {n_train} training clips.</p><ul>{lis}</ul>")


def _mean_auc(m: dict[str, Any]) -> float:
    aucs = [v for v in m["per_class_auc"].values() if v is not None]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def _score_rows(scores: dict[str, Any], names: list[str], weights: dict[str, float]) -> list[list[Any]]:
    rows = []
    for name in names:
        m = scores[name]
        weight = f"{weights[name]:.3f}" if name in weights else ""
        rows.append([name, weight, f"{m['mean_log_loss']:.5f}", f"{_mean_auc(m):.3f}", f"{m['top1_accuracy']:.3f}",
                     m.get("n_videos", "")])
    return rows


def _scores(metrics: dict[str, Any]) -> str:
    names = [*_models(metrics), BLEND]
    header = ["model", "blend weight", "mean log loss", "mean AUC", "top-1 accuracy", "videos"]
    weights = _weights(metrics)
    oof = {**metrics["oof"], "class prior": metrics["prior_baseline_oof"]}
    out = "<h3>Out of fold (training labels)</h3>" + _table(_score_rows(oof, [*names, "class prior"], weights), header)
    if "test" in metrics:
        test_names = [n for n in names if n in metrics["test"]]
        out += "<h3>Held-out test labels</h3>" + _table(_score_rows(metrics["test"], test_names, weights), header)
    return out


def _per_class_bars(frame: pd.DataFrame, ylabel: str, title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots()
    frame.loc[list(CLASS_NAMES)].astype(float).plot.bar(ax=ax, width=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: bars reach the top
    return fig, ax


def _per_class(metrics: dict[str, Any]) -> str:
    names = [*_models(metrics), BLEND]
    loss = pd.DataFrame({m: metrics["oof"][m]["per_class_log_loss"] for m in names}
                        | {"class prior": metrics["prior_baseline_oof"]["per_class_log_loss"]})
    fig, _ = _per_class_bars(loss, "out-of-fold log loss", "Per-class log loss (lower is better)")
    charts = _png(fig, "per-class log loss")
    auc = pd.DataFrame({m: {c: (np.nan if v is None else v) for c, v in metrics["oof"][m]["per_class_auc"].items()}
                        for m in names})
    fig, ax = _per_class_bars(auc, "out-of-fold ROC AUC", "Per-class AUC (higher is better; no bar: AUC undefined)")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0, 1.02)
    return charts + _png(fig, "per-class AUC")


def _calibration(truth: pd.DataFrame, preds: dict[str, pd.DataFrame]) -> str:
    classes = main_classes(truth)
    if not classes:
        return "<p>No class has both positive and negative training clips.</p>"
    cols = min(3, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig = Figure(figsize=(4 * cols, 3.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, cls in zip(axes.flat, classes, strict=False):
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
        for name, pred in preds.items():
            observed, predicted = calibration_curve(truth[cls], pred[cls], n_bins=CALIBRATION_BINS,
                                                    strategy="quantile")
            ax.plot(predicted, observed, marker="o", ms=3, lw=2.2 if name == BLEND else 1, label=name)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{cls} ({int(truth[cls].sum())} positive)",
               xlabel="mean predicted probability", ylabel="observed frequency")
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return (f"<p>Out-of-fold reliability of the blend and each model for the {len(classes)} most prevalent classes "
            f"({CALIBRATION_BINS} quantile bins; points on the diagonal are calibrated).</p>"
            + _png(fig, "reliability curves"))


def _prevalence(truth: pd.DataFrame) -> str:
    counts = truth[list(CLASS_NAMES)].sum().astype(int).sort_values(kind="stable")
    main = set(main_classes(truth))
    fig = Figure(figsize=(8, 6.5))
    ax = fig.subplots()
    ax.barh(counts.index, counts.to_numpy(), color=["#d9822b" if c in main else "#4c72b0" for c in counts.index])
    for y, v in enumerate(counts.to_numpy()):
        ax.text(v, y, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("training clips with the label")
    ax.set_title("Class prevalence in the training labels (orange: calibration classes)")
    n_multi = int((truth[list(CLASS_NAMES)].sum(axis=1) > 1).sum())
    return (f"<p>{len(truth)} training clips, {n_multi} with more than one label.</p>"
            + _png(fig, "class prevalence"))


def _contact_picks(truth: pd.DataFrame, pred: pd.DataFrame) -> list[tuple[str, bool]]:
    """The blend's most confident right and wrong top-1 clips; right = the top class is a true class."""
    proba = pred.to_numpy()
    top = proba.argmax(axis=1)
    right = truth.loc[pred.index, list(CLASS_NAMES)].to_numpy()[np.arange(len(top)), top] == 1
    order = np.argsort(-proba.max(axis=1), kind="stable")
    picks = [i for i in order if right[i]][:CONTACT_PER_KIND] + [i for i in order if not right[i]][:CONTACT_PER_KIND]
    return [(str(pred.index[i]), bool(right[i])) for i in picks]


def _frame_strip(path: str, embed: EmbedConfig, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """A few of the frames the model saw (same sampling as the embed stage), side by side as one PNG."""
    with open_clip(path, storage_options) as source:
        frames, _ = read_clip(source, sample_fps=embed.sample_fps, max_seconds=embed.max_seconds,
                              n_frames=embed.n_frames, size=CONTACT_SIZE, timeout_s=_DECODE_TIMEOUT_S)
    keep = np.unique(np.linspace(0, len(frames) - 1, min(CONTACT_FRAMES, len(frames))).round().astype(int))
    gap = np.full((CONTACT_SIZE, 4, 3), 255, np.uint8)
    strip = np.concatenate([x for i in keep for x in (frames[i], gap)][:-1], axis=1)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, strip, format="png")
    return buf.getvalue()


def frame_strip_or_error(path: str | None, embed: EmbedConfig,
                         storage_options: Mapping[str, Any] | None = None) -> bytes | str:
    """The PNG strip of a clip, or the reason it is unavailable (a Dask task: workers read the clips)."""
    try:
        if path is None:
            raise FileNotFoundError("not in the catalog")
        return _frame_strip(path, embed, storage_options)
    except Exception as err:  # one undecodable clip must not cost the whole report
        return f"{type(err).__name__}: {err}"


def _contact_card(video_id: str, right: bool, truth: pd.Series, pred: pd.Series, strip: bytes | str) -> str:
    if isinstance(strip, bytes):
        picture = _img(strip, f"frames of {video_id}")
    else:
        picture = f'<p class="err">frames unavailable: {html.escape(strip)}</p>'
    labels = ", ".join(c for c in CLASS_NAMES if truth[c] == 1) or "(none)"
    top3 = ", ".join(f"{c} {p:.3f}" for c, p in pred.sort_values(ascending=False, kind="stable").head(3).items())
    kind = "right" if right else "wrong"
    return (f"<figure>{picture}<figcaption><b>{html.escape(video_id)}</b> "
            f'<span class="{kind}">{kind}</span><br>true: {html.escape(labels)}<br>'
            f"top-3: {html.escape(top3)}</figcaption></figure>")


def _contact_sheet(truth: pd.DataFrame, catalog: pd.DataFrame, pred: pd.DataFrame, embed: EmbedConfig,
                   client: Client | None, storage_options: Mapping[str, Any] | None) -> str:
    picks = _contact_picks(truth, pred)
    if not picks:
        return "<p>No out-of-fold predictions.</p>"
    paths = catalog[PATH].to_dict()
    wanted = [paths.get(v) for v, _ in picks]
    options = dict(storage_options or {})
    if client is not None:  # the clips are read where the data is reachable: on the workers
        strips = client.gather(client.map(frame_strip_or_error, wanted, embed=embed, storage_options=options,
                                          pure=False))
    else:
        strips = [frame_strip_or_error(p, embed, options) for p in wanted]
    cards = "".join(_contact_card(v, right, truth.loc[v], pred.loc[v], strip)
                    for (v, right), strip in zip(picks, strips, strict=True))
    return (f"<p>The blend's {CONTACT_PER_KIND} most confident right and {CONTACT_PER_KIND} most confident wrong "
            f"out-of-fold top-1 predictions; frames sampled as in the embed stage "
            f"({embed.sample_fps:g} fps, at most {embed.max_seconds:g} s).</p><div class=\"sheet\">{cards}</div>")


def _timings(run_dir: RunPath) -> str:
    stages = Manifest(run_dir).data.get("stages", {})
    rows = [[name, rec.get("status"), f"{rec.get('seconds') or 0:.1f}", json.dumps(rec.get("counts", {})),
             rec.get("error") or ""] for name, rec in stages.items()]
    return _table(rows, ["stage", "status", "seconds", "counts", "error"])


def _failures(failed: pd.DataFrame) -> str:
    if not len(failed):
        return "<p>None.</p>"
    shown = failed.head(MAX_FAILURES_SHOWN)
    more = (f" The first {len(shown)} are listed; all are in the embedding parts' <code>error</code> column."
            if len(failed) > len(shown) else "")
    return (f"<p>{len(failed)} video(s) could not be decoded.{more}</p>"
            + _table(shown.values.tolist(), ["video", "reason"]))


def _embed_config(run_dir: RunPath) -> EmbedConfig:
    """The run's frame sampling; the defaults when its config.yaml is missing or no longer validates."""
    try:
        return load_config(run_dir / "config.yaml").embed
    except ConfigError:
        return EmbedConfig()


def _oof_sections(run_dir: RunPath, truth: pd.DataFrame, catalog: pd.DataFrame, metrics: dict[str, Any],
                  client: Client | None, storage_options: Mapping[str, Any] | None) -> tuple[str, str]:
    """The calibration and contact-sheet bodies, which need the out-of-fold predictions themselves."""
    try:
        preds = oof_predictions(run_dir, metrics)
    except (FileNotFoundError, KeyError) as err:
        missing = f"<p>Out-of-fold predictions unavailable: {html.escape(f'{type(err).__name__}: {err}')}</p>"
        return missing, missing
    truth = truth.loc[preds[BLEND].index]
    ordered = {BLEND: preds[BLEND], **{m: p for m, p in preds.items() if m != BLEND}}
    return (_calibration(truth, ordered),
            _contact_sheet(truth, catalog, preds[BLEND], _embed_config(run_dir), client, storage_options))


def write_report(run_dir: RunPath, embed_dir: RunPath, *, client: Client | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> RunPath:
    """Render ``run_dir/report.html`` from metrics.json, the OOF predictions, catalog, manifest, embeddings, config.

    The contact sheet's few clips are decoded by ``client``'s workers when given (else here), opened with the
    data's ``storage_options``.
    """
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    catalog = read_parquet(run_dir / CATALOG_NAME).set_index(VIDEO_ID)
    truth = catalog.loc[catalog[SPLIT] == SPLIT_TRAIN, list(CLASS_NAMES)]
    failed = failed_videos(embed_dir)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
    calibration, contact_sheet = _oof_sections(run_dir, truth, catalog, metrics, client, storage_options)
    sections = [
        ("summary", "Summary", _summary(metrics, len(failed), len(truth))),
        ("scores", "Scores", _scores(metrics)),
        ("per-class", "Per-class log loss and AUC", _per_class(metrics)),
        ("calibration", "Calibration (out of fold)", calibration),
        ("prevalence", "Class prevalence", _prevalence(truth)),
        ("contact-sheet", "Contact sheet", contact_sheet),
        ("timings", "Stages", _timings(run_dir)),
        ("failures", "Failed videos", _failures(failed)),
        ("config", "Configuration", f"<pre>{html.escape(config_text)}</pre>"),
    ]
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'
                     for sid, title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>jungletrap report: "
            f"{html.escape(run_dir.name)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>jungletrap run: {html.escape(run_dir.name)}</h1><nav>{nav}</nav>\n{body}</body></html>")
    out = run_dir / "report.html"
    write_text_atomic(page, out)
    return out
