"""The run directory's ``manifest.json``: per stage, what made it, what it wrote, how it ended.

Only the process driving the pipeline writes the manifest (workers return counts instead), and every write
replaces the file atomically (a rename locally, one upload on an object store), so a reader never sees half a
manifest. The manifest holds config hashes, never the config itself (no storage options, no credentials).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from jungletrap import __version__
from jungletrap.storage import RunPath, run_path, write_text_atomic

__all__ = ["Manifest", "StageRecord", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"


@dataclass
class StageRecord:
    """One stage's entry: status is ``running``, ``done``, ``failed`` or ``interrupted``.

    ``lineage`` (done stages): what its outputs were made from, see :mod:`jungletrap.lineage`.
    """

    status: str
    config_hash: str
    started: float
    finished: float | None = None
    seconds: float | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    lineage: dict[str, Any] | None = None


class Manifest:
    """Load, update and atomically save a run's manifest."""

    def __init__(self, run_dir: RunPath | str) -> None:
        self.path = run_path(run_dir) / MANIFEST_NAME
        self.data: dict[str, Any] = {"code_version": __version__, "created": time.time(), "stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            self.data.setdefault("stages", {})

    def stage(self, name: str) -> StageRecord | None:
        raw = self.data["stages"].get(name)
        if not raw:
            return None
        known = StageRecord.__dataclass_fields__
        return StageRecord(**{k: v for k, v in raw.items() if k in known})  # a newer version's keys are ignored

    def is_done(self, name: str, config_hash: str) -> bool:
        """True when the stage finished with the same config and its outputs still exist."""
        rec = self.stage(name)
        if rec is None or rec.status != "done" or rec.config_hash != config_hash:
            return False
        return all((self.path.parent / out).exists() for out in rec.outputs)

    def start(self, name: str, config_hash: str) -> None:
        self._put(name, StageRecord(status="running", config_hash=config_hash, started=time.time()))

    def finish(
        self,
        name: str,
        *,
        status: str,
        counts: dict[str, Any] | None = None,
        outputs: list[str] | None = None,
        error: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> None:
        rec = self.stage(name)
        if rec is None:
            raise KeyError(f"stage {name!r} was never started")
        rec.status = status
        rec.finished = time.time()
        rec.seconds = round(rec.finished - rec.started, 3)
        rec.counts = dict(counts or {})
        rec.outputs = list(outputs or [])
        rec.error = error
        rec.lineage = lineage
        self._put(name, rec)

    def record_event(self, text: str) -> None:
        """Append a line to the run's history (interruptions, resumes)."""
        self.data.setdefault("events", []).append({"time": time.time(), "event": text})
        self.save()

    def _put(self, name: str, rec: StageRecord) -> None:
        self.data["stages"][name] = rec.__dict__.copy()
        self.data["code_version"] = __version__
        self.save()

    def save(self) -> None:
        write_text_atomic(json.dumps(self.data, indent=2, sort_keys=True), self.path)
