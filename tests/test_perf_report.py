"""perf/<stage>.html opens offline: Bokeh is inside the page, no script is loaded from elsewhere."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from distributed import Client

from jungletrap.cluster import ClusterInfo
from jungletrap.config import JobConfig
from jungletrap.pipeline import PERF_DIR, StageContext, _perf_report


class _Scripts(HTMLParser):
    """Every ``<script>``'s ``src`` (if any) and inline code length; every stylesheet or preload ``<link>``."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.inline: list[int] = []
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "link" and "icon" not in (attr.get("rel") or ""):  # a missing favicon breaks nothing
            self.links.append(attr.get("href") or "")
        if tag == "script":
            src = attr.get("src")
            if src:
                self.sources.append(src)
            self._open = True
            self.inline.append(0)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._open = False

    def handle_data(self, data: str) -> None:
        if self._open:
            self.inline[-1] += len(data)


def test_performance_report_loads_no_remote_script(dask_client: Client, tmp_path: Path) -> None:
    info = ClusterInfo(kind="local", dashboard_link=None, n_workers=2, gpu=False)
    ctx = StageContext(dask_client, JobConfig(), tmp_path, info)
    with _perf_report(ctx, "demo"):
        assert sum(dask_client.gather(dask_client.map(lambda x: x + 1, range(8)))) == 36
    page = (tmp_path / PERF_DIR / "demo.html").read_text(encoding="utf-8")
    scripts = _Scripts()
    scripts.feed(page)
    assert "Dask Performance Report" in page
    assert scripts.sources == [] and scripts.links == []  # a CDN <script src> leaves the page blank offline
    assert max(scripts.inline) > 100_000  # Bokeh itself is inline


def test_an_interrupted_stage_stops_without_building_its_report(dask_client: Client, tmp_path: Path) -> None:
    """Ctrl-C/SIGTERM should stop the run now: the report costs the scheduler seconds of rendering."""
    info = ClusterInfo(kind="local", dashboard_link=None, n_workers=2, gpu=False)
    ctx = StageContext(dask_client, JobConfig(), tmp_path, info)
    with pytest.raises(KeyboardInterrupt), _perf_report(ctx, "demo"):
        raise KeyboardInterrupt
    assert not (tmp_path / PERF_DIR / "demo.html").exists()
