"""Shared argument parsing for the job scripts: the same options as the CLI subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from jungletrap.cli import execute

__all__ = ["run_job"]


def run_job(stages: list[str], argv: list[str] | None = None, *, description: str = "") -> int:
    """Parse ``--config/--set/--run-dir/--scheduler/--scheduler-file/--strict`` and run ``stages``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", type=Path, default=None, help="YAML config (conf/*.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override: section.key=value")
    parser.add_argument("--run-dir", default=None, help="run directory (path or URL)")
    parser.add_argument("--scheduler", default=None, help="existing scheduler address, e.g. tcp://host:8786")
    parser.add_argument("--scheduler-file", type=Path, default=None, help="scheduler file of a running cluster")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any video failed")
    parser.add_argument("--force", action="store_true", help="re-run stages already done")
    args = parser.parse_args(argv)
    return execute(stages, config=args.config, sets=args.sets, run_dir=args.run_dir, scheduler=args.scheduler,
                   scheduler_file=args.scheduler_file, strict=args.strict, force=args.force)
