"""``report.html``: one self-contained page a person reads instead of scrolling logs.

Sections: summary, scores per model vs the class-prior baseline, per-class log loss chart, stage timings,
failed videos with reasons, and the resolved config. Charts are matplotlib PNGs embedded as base64, so the
file has no external URL and can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from jungletrap.manifest import Manifest  # noqa: E402
from jungletrap.schema import CLASS_NAMES, ERROR, STATUS, STATUS_ERROR, VIDEO_ID  # noqa: E402
from jungletrap.storage import write_text_atomic  # noqa: E402

__all__ = ["write_report", "failed_videos"]

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#eee}td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _per_class_chart(metrics: dict[str, Any]) -> str:
    models = {**metrics["oof"], "prior": metrics["prior_baseline_oof"]}
    frame = pd.DataFrame({m: v["per_class_log_loss"] for m, v in models.items()}).loc[list(CLASS_NAMES)]
    fig, ax = plt.subplots(figsize=(11, 4))
    frame.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("out-of-fold log loss")
    ax.set_title("Per-class log loss (lower is better)")
    return _png(fig)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _scores(metrics: dict[str, Any]) -> str:
    rows = []
    for name, m in [*metrics["oof"].items(), ("class prior", metrics["prior_baseline_oof"])]:
        aucs = [v for v in m["per_class_auc"].values() if v is not None]
        mean_auc = sum(aucs) / len(aucs) if aucs else float("nan")
        rows.append([name, f"{m['mean_log_loss']:.5f}", f"{mean_auc:.3f}", f"{m['top1_accuracy']:.3f}"])
    table = _table(rows, ["model (out of fold)", "mean log loss", "mean AUC", "top-1 accuracy"])
    if "test" in metrics:
        test_rows = [[n, f"{m['mean_log_loss']:.5f}", f"{m['top1_accuracy']:.3f}"] for n, m in metrics["test"].items()]
        table += "<h3>Held-out test labels</h3>" + _table(test_rows, ["model", "mean log loss", "top-1 accuracy"])
    return table


def failed_videos(embed_dir: Path) -> pd.DataFrame:
    """Every video whose decode failed, with the reason, from the embedding parts."""
    parts = sorted(embed_dir.glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=[VIDEO_ID, ERROR])
    frame = pd.concat([pd.read_parquet(p, columns=[VIDEO_ID, STATUS, ERROR]) for p in parts], ignore_index=True)
    return frame.loc[frame[STATUS] == STATUS_ERROR, [VIDEO_ID, ERROR]].reset_index(drop=True)


def _timings(run_dir: Path) -> str:
    stages = Manifest(run_dir).data.get("stages", {})
    rows = [[name, rec.get("status"), f"{rec.get('seconds') or 0:.1f}", json.dumps(rec.get("counts", {}))]
            for name, rec in stages.items()]
    return _table(rows, ["stage", "status", "seconds", "counts"])


def write_report(run_dir: Path, embed_dir: Path) -> Path:
    """Render ``run_dir/report.html`` from metrics.json, the manifest, the embeddings and config.yaml."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    failed = failed_videos(embed_dir)
    blend, prior = metrics["oof"]["blend"]["mean_log_loss"], metrics["prior_baseline_oof"]["mean_log_loss"]
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
    failed_html = _table(failed.values.tolist(), ["video", "reason"]) if len(failed) else "<p>None.</p>"
    body = f"""<h1>jungletrap run: {html.escape(run_dir.name)}</h1>
<section id="summary"><h2>Summary</h2><p>Blend out-of-fold mean log loss <b>{blend:.5f}</b>
versus <b>{prior:.5f}</b> for the class-prior baseline; probabilities clipped at {metrics['clip']:g}.
{len(failed)} video(s) failed to decode.</p></section>
<section id="scores"><h2>Scores</h2>{_scores(metrics)}</section>
<section id="per-class"><h2>Per-class log loss</h2>{_per_class_chart(metrics)}</section>
<section id="timings"><h2>Stages</h2>{_timings(run_dir)}</section>
<section id="failures"><h2>Failed videos</h2>{failed_html}</section>
<section id="config"><h2>Configuration</h2><pre>{html.escape(config_text)}</pre></section>"""
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>jungletrap report</title>" \
           f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    out = run_dir / "report.html"
    write_text_atomic(page, out)
    return out
